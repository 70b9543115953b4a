"""Tiny datasets written in each real on-disk layout, with the labels they should produce.

Each builder writes into a directory and returns the expected records as
{id: (labels float32 [K], difficult bool [K])}, computed here from the raw annotations with
plain loops, independently of kmcl_jax.data. Images carry their record's identity in pixel
values (a per-image constant colour), so tests can check that image and labels belong together.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

VOC_CLASSES = (
  'aeroplane',
  'bicycle',
  'bird',
  'boat',
  'bottle',
  'bus',
  'car',
  'cat',
  'chair',
  'cow',
  'diningtable',
  'dog',
  'horse',
  'motorbike',
  'person',
  'pottedplant',
  'sheep',
  'sofa',
  'train',
  'tvmonitor',
)
CXR_CLASSES = (
  'Atelectasis',
  'Cardiomegaly',
  'Effusion',
  'Infiltration',
  'Mass',
  'Nodule',
  'Pneumonia',
  'Pneumothorax',
  'Consolidation',
  'Edema',
  'Emphysema',
  'Fibrosis',
  'Pleural_Thickening',
  'Hernia',
)
ADP_L1 = ('E', 'C', 'H', 'S', 'A', 'M', 'N', 'G', 'T')


def colour_of(n: int) -> tuple[int, int, int]:
  """A distinct flat colour per image number (survives JPEG coding within a few levels)."""
  return (40 + (n * 37) % 180, 40 + (n * 71) % 180, 40 + (n * 13) % 180)


def write_image(path: str, n: int, size: tuple[int, int] = (40, 30), mode: str = 'RGB') -> None:
  """Writes a flat image of colour_of(n); size is (width, height)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.new('RGB', size, colour_of(n))
  if mode == 'L':
    img = img.convert('L')
  img.save(path, quality=95) if path.endswith('.jpg') else img.save(path)


def check_records(source, expected: dict, *, colour_check: bool = True):
  """Every record's labels, difficult flags, dtypes and image identity; exact id set."""
  assert len(source) == len(expected)
  seen = set()
  for i in range(len(source)):
    r = source[i]
    assert set(r) == {'image', 'labels', 'difficult', 'id'}
    labels, difficult = expected[r['id']]
    assert r['image'].dtype == np.uint8 and r['image'].ndim == 3 and r['image'].shape[2] == 3
    assert r['labels'].dtype == np.float32 and r['difficult'].dtype == bool
    np.testing.assert_array_equal(r['labels'], labels)
    np.testing.assert_array_equal(r['difficult'], difficult)
    seen.add(r['id'])
    if colour_check:
      n = int(''.join(ch for ch in r['id'].split('.')[0].split('_')[0] if ch.isdigit()))
      mean = r['image'].reshape(-1, 3).mean(0)
      assert np.abs(mean - colour_of(n)).max() < 6, (r['id'], mean)
  assert seen == set(expected)


def make_voc(root: str, *, n_trainval: int = 7, n_test: int = 5, seed: int = 0) -> dict:
  """VOCdevkit/VOC2007 with ImageSets/Main class files using 1 / -1 / 0 (difficult)."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, 'VOCdevkit', 'VOC2007')
  main = os.path.join(base, 'ImageSets', 'Main')
  os.makedirs(main, exist_ok=True)
  expected = {}
  splits = {
    'trainval': [f'{i:06d}' for i in range(1, n_trainval + 1)],
    'test': [f'{i:06d}' for i in range(101, 101 + n_test)],
  }
  for split, ids in splits.items():
    values = rng.choice([1, -1, -1, -1, 0], size=(len(ids), 20))
    values[0, :] = -1
    values[0, 3] = 0  # an image whose only object is difficult
    expected[split] = {}
    with open(os.path.join(main, f'{split}.txt'), 'w') as f:
      f.write(''.join(f'{i}\n' for i in ids))
    for k, name in enumerate(VOC_CLASSES):
      with open(os.path.join(main, f'{name}_{split}.txt'), 'w') as f:
        for row, i in enumerate(ids):
          f.write(f'{i} {values[row, k]:2d}\n')  # the devkit pads: '000005 -1', '000007  1'
    for row, i in enumerate(ids):
      labels = np.array([1.0 if v == 1 else 0.0 for v in values[row]], np.float32)
      difficult = np.array([v == 0 for v in values[row]])
      expected[split][i] = (labels, difficult)
      write_image(os.path.join(base, 'JPEGImages', f'{i}.jpg'), int(i), size=(50, 37))
  return expected


def make_coco(root: str) -> dict:
  """annotations/instances_{train,val}2014.json with gaps in category ids and empty images."""
  categories = [{'id': cid, 'name': f'cat{cid}', 'supercategory': 'x'} for cid in (1, 2, 5, 11, 90)]
  categories_shuffled = [categories[i] for i in (3, 0, 4, 2, 1)]  # json order is not id order
  index = {c['id']: k for k, c in enumerate(categories)}
  expected = {}
  for split, image_ids, anns in (
    (
      'train',
      [9, 3, 25, 14, 30],
      [(9, 5), (9, 5), (9, 90), (3, 1), (25, 11), (25, 2), (25, 1), (30, 90)],
    ),
    ('val', [42, 7, 8], [(42, 2), (8, 11), (8, 1)]),
  ):
    images = [
      {'id': i, 'file_name': f'COCO_{split}2014_{i:012d}.jpg', 'height': 30, 'width': 40}
      for i in image_ids
    ]
    annotations = [
      {
        'id': 1000 + n,
        'image_id': i,
        'category_id': c,
        'iscrowd': 0,
        'area': 10.0,
        'bbox': [0, 0, 2, 2],
      }
      for n, (i, c) in enumerate(anns)
    ]
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    with open(os.path.join(root, 'annotations', f'instances_{split}2014.json'), 'w') as f:
      json.dump(
        {'images': images, 'annotations': annotations, 'categories': categories_shuffled}, f
      )
    expected[split] = {}
    for i in image_ids:
      labels = np.zeros(len(categories), np.float32)
      for image_id, c in anns:
        if image_id == i:
          labels[index[c]] = 1.0
      expected[split][str(i)] = (labels, np.zeros(len(categories), bool))
      write_image(os.path.join(root, f'{split}2014', f'COCO_{split}2014_{i:012d}.jpg'), i)
  expected['class_names'] = tuple(f'cat{c["id"]}' for c in categories)
  return expected


def make_adp(root: str, *, n_rows: int = 12, seed: int = 0) -> dict:
  """ADP_EncodedLabels_Release1_Flat.csv (L1 + some L2 columns), splits/*.npy, png patches."""
  rng = np.random.default_rng(seed)
  columns = ['Patch Names', 'E', 'E.M', 'C', 'H', 'S', 'A', 'M', 'N', 'G', 'T', 'X.unused']
  names = [f'{n:03d}.png_crop_{n}.png' for n in range(n_rows)]
  values = (rng.random((n_rows, len(columns) - 1)) < 0.3).astype(int)
  values[[2, 7], :] = 0  # rows without any label
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'ADP_EncodedLabels_Release1_Flat.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for name, row in zip(names, values):
      writer.writerow([name] + [str(v) for v in row])
  splits = {
    'train': np.array([0, 2, 3, 5, 7, 9, 11]),
    'valid': np.array([1, 4]),
    'test': np.array([6, 8, 10]),
  }
  os.makedirs(os.path.join(root, 'splits'), exist_ok=True)
  expected = {}
  for split, rows in splits.items():
    np.save(os.path.join(root, 'splits', f'{split}.npy'), rows)
    expected[split] = {}
    for r in rows:
      labels = np.array([values[r, columns.index(c) - 1] for c in ADP_L1], np.float32)
      if labels.any():
        expected[split][names[r]] = (labels, np.zeros(9, bool))
  for n, name in enumerate(names):
    write_image(os.path.join(root, 'img_res_1um_bicubic', name), n, size=(32, 32))
  return expected


def make_chestxray14(root: str, *, n_images: int = 16, seed: int = 0) -> dict:
  """Data_Entry_2017.csv, the two lists, grey PNGs split over images_001/ and images_002/."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  rows, expected_labels, patients = [], {}, {}
  for n in range(n_images):
    patient = n // 2 + 1  # two images per patient
    name = f'{patient:08d}_{n % 2:03d}.png'
    findings = [c for c in CXR_CLASSES if rng.random() < 0.15]
    text = '|'.join(findings) if findings else 'No Finding'
    rows.append([name, text, '0', str(patient), '58', 'M', 'PA', '64', '64', '0.14', '0.14'])
    expected_labels[name] = np.array([c in findings for c in CXR_CLASSES], np.float32)
    patients[name] = patient
    folder = 'images_001' if n < n_images // 2 else 'images_002'
    write_image(os.path.join(root, folder, 'images', name), n, size=(24, 24), mode='L')
  with open(os.path.join(root, 'Data_Entry_2017.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(
      [
        'Image Index',
        'Finding Labels',
        'Follow-up #',
        'Patient ID',
        'Patient Age',
        'Patient Gender',
        'View Position',
        'OriginalImage[Width',
        'Height]',
        'OriginalImagePixelSpacing[x',
        'y]',
      ]
    )
    writer.writerows(rows)
  names = [r[0] for r in rows]
  lists = {'train_val': names[: 3 * n_images // 4], 'test': names[3 * n_images // 4 :]}
  for split, file in (('train_val', 'train_val_list.txt'), ('test', 'test_list.txt')):
    with open(os.path.join(root, file), 'w') as f:
      f.write(''.join(f'{n}\n' for n in lists[split]))
  zeros = np.zeros(14, bool)
  return {
    'lists': lists,
    'patients': patients,
    **{s: {n: (expected_labels[n], zeros) for n in lists[s]} for s in lists},
  }


def make_messy(path: str) -> None:
  """Rewrites a text file the way a spreadsheet on Windows may save it: UTF-8 byte-order mark,
  CRLF line endings, trailing spaces on every line."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  with open(path, 'w', encoding='utf-8-sig', newline='') as f:
    f.write(''.join(f'{line}  \r\n' for line in lines))


CSV_CLASSES = ('cat', 'dog', 'person', 'zebra')  # sorted; 'zebra' only occurs in test.csv
CSV_ROWS = {
  'train': [
    ('images/001.jpg', 'dog cat'),
    ('images/002.jpg', 'person'),
    ('images/003.jpg', ''),
    ('images/004.jpg', 'cat person dog'),
    ('images/005.png', 'dog'),
  ],
  'val': [('images/006.jpg', 'cat'), ('images/007.jpg', 'person dog')],
  'test': [('images/008.jpg', 'zebra cat'), ('images/009.jpg', 'dog')],
}


def make_csv(root: str, *, columns: Sequence[str] | None = None) -> dict:
  """train/val/test.csv over CSV_ROWS, with 'labels' names or, given `columns` (class names in
  column order), one 0/1 column per class; images/NNN.jpg|png in colour_of(NNN)."""
  expected = {}
  for split, rows in CSV_ROWS.items():
    expected[split] = {}
    with open(os.path.join(root, f'{split}.csv'), 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['image', *columns] if columns else ['image', 'labels'])
      for image, names in rows:
        present = names.split()
        writer.writerow(
          [image, *(int(c in present) for c in columns)] if columns else [image, names]
        )
        order = columns or CSV_CLASSES
        labels = np.array([c in present for c in order], np.float32)
        expected[split][image] = (labels, np.zeros(len(order), bool))
        write_image(os.path.join(root, image), int(image[7:10]), size=(12, 10))
  expected['class_names'] = tuple(columns or CSV_CLASSES)
  return expected
