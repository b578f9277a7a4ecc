#!/usr/bin/env bash
# Lays out Tiny-ImageNet (Stanford CS231n: 200 classes, 64x64 JPEGs, 500 training images per
# class, 10,000 labelled validation images used as the test split) as the image folder that
# --dataset reads:
#   DEST/train/<wnid>/<image>.JPEG   100,000 images
#   DEST/test/<wnid>/<image>.JPEG     10,000 images (the validation split, by val_annotations.txt)
#
#   bash scripts/tinyimagenet_folder.sh SOURCE DEST
#
# SOURCE: the official zip (tiny-imagenet-200.zip, http://cs231n.stanford.edu/tiny-imagenet-200.zip),
# the folder it extracts to (tiny-imagenet-200/), or a folder that holds tiny-imagenet-200/. The
# images are copied, SOURCE is left as it is; a DEST that already holds train/ and test/ is left
# alone. Some images are grayscale JPEGs: the loader decodes every image to 3 channels.
set -euo pipefail
src=${1:?usage: tinyimagenet_folder.sh SOURCE DEST}
dest=${2:?usage: tinyimagenet_folder.sh SOURCE DEST}

if [[ -d "$dest/train" && -d "$dest/test" ]]; then
  echo "$dest: already laid out (train/ and test/ exist)"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -f "$src" ]]; then
  unzip -q "$src" -d "$work"
  root=$work/tiny-imagenet-200
elif [[ -d "$src/tiny-imagenet-200" ]]; then
  root=$src/tiny-imagenet-200
else
  root=$src
fi
if [[ ! -d "$root/train" || ! -f "$root/val/val_annotations.txt" ]]; then
  echo "tinyimagenet_folder.sh: $src holds no tiny-imagenet-200 (train/ and" \
       "val/val_annotations.txt expected)" >&2
  exit 2
fi
staging=$dest.partial
rm -rf "$staging"
mkdir -p "$staging/train" "$staging/test"
for dir in "$root"/train/*/; do
  wnid=$(basename "$dir")
  mkdir -p "$staging/train/$wnid"
  cp "$dir"/images/* "$staging/train/$wnid/"
done
while read -r file wnid _; do
  mkdir -p "$staging/test/$wnid"
  cp "$root/val/images/$file" "$staging/test/$wnid/"
done < "$root/val/val_annotations.txt"
# Whole or not at all: an interrupted copy leaves DEST.partial, never a DEST with missing images.
mkdir -p "$dest"
mv "$staging/train" "$staging/test" "$dest/"
rmdir "$staging"
echo "$dest: train $(find "$dest/train" -type f | wc -l) images," \
     "test $(find "$dest/test" -type f | wc -l), classes $(ls "$dest/train" | wc -l)"
