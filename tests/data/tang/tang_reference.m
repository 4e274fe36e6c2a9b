% Writes the values of Linfeng-Tang/Evaluation-for-Image-Fusion's analysis_Reference.m (easy = 1)
% for every case folder {fused,ir,vis}.png under CASES as JSON to OUT.
%
%   octave --no-gui --norc -q tang_reference.m EVALUATION_DIR CASES OUT
%
% EVALUATION_DIR is that repository's Evaluation/ folder. The images are read and converted as
% its Evaluation_for_Single_Image.m does (imread, rgb2gray for 3-channel files) and passed as
% analysis_Reference(fused, ir, vis, 1).
pkg load image
args = argv();
addpath(args{1});
cases = dir(args{2});
names = {'EN', 'SF', 'SD', 'PSNR', 'MSE', 'MI', 'VIF', 'AG', 'CC', 'SCD', 'Qabf'};
fid = fopen(args{3}, 'w');
fprintf(fid, '{\n');
first = true;
for c = 1:numel(cases)
  if ~cases(c).isdir || cases(c).name(1) == '.'
    continue;
  end
  folder = fullfile(args{2}, cases(c).name);
  img = cell(1, 3);
  files = {'fused.png', 'ir.png', 'vis.png'};
  for k = 1:3
    x = imread(fullfile(folder, files{k}));
    if size(x, 3) > 2
      x = rgb2gray(x);
    end
    img{k} = x;
  end
  vals = cell(1, 17);
  [vals{:}] = analysis_Reference(img{1}, img{2}, img{3}, 1);
  if ~first
    fprintf(fid, ',\n');
  end
  first = false;
  fprintf(fid, '  "%s": {', cases(c).name);
  for k = 1:numel(names)
    v = vals{k};
    if isnan(v)
      txt = 'NaN';
    else
      txt = sprintf('%.17g', v);
    end
    sep = ', ';
    if k == numel(names)
      sep = '';
    end
    fprintf(fid, '"%s": %s%s', names{k}, txt, sep);
  end
  fprintf(fid, '}');
  printf('%s done\n', cases(c).name);
  fflush(stdout);
end
fprintf(fid, '\n}\n');
fclose(fid);
