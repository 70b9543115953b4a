"""Sources read each dataset's real on-disk layout (fixtures in tests/data_fixtures.py)."""

import gc
import os
import re

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from kmcl_jax.data import (
  UnreadableImageError,
  accepted_options,
  get_source,
  holdout_split,
  pipeline,
  synthetic,
  tfds_source,
)
from kmcl_jax.data.base import decode_image


def test_voc_labels_and_difficult(tmp_path):
  expected = fx.make_voc(str(tmp_path))
  for split in ('trainval', 'test'):
    src = get_source('voc2007', root=str(tmp_path), split=split)
    assert src.class_names == fx.VOC_CLASSES
    fx.check_records(src, expected[split])
    assert [src[i]['id'] for i in range(len(src))] == sorted(expected[split])
  # root may also be VOCdevkit/VOC2007 itself.
  src = get_source('voc2007', root=str(tmp_path / 'VOCdevkit' / 'VOC2007'), split='test')
  assert len(src) == len(expected['test'])


def test_voc_decode_size_uses_dct_scaling(tmp_path):
  fx.make_voc(str(tmp_path), n_trainval=1, n_test=1)
  path = str(tmp_path / 'VOCdevkit/VOC2007/JPEGImages/000001.jpg')
  Image.new('RGB', (500, 375), (200, 30, 60)).save(path, quality=95)
  src = get_source('voc2007', root=str(tmp_path), split='trainval', decode_size=100)
  # libjpeg-turbo scales by n/8: 3/8 gives ceil(500 * 3/8) x ceil(375 * 3/8) = 188 x 141,
  # 2/8 would give 125 x 94 < 100.
  assert src[0]['image'].shape == (141, 188, 3)
  assert get_source('voc2007', root=str(tmp_path), split='trainval')[0]['image'].shape == (
    375,
    500,
    3,
  )


def test_coco_category_gaps_and_unannotated_images(tmp_path):
  expected = fx.make_coco(str(tmp_path))
  for split in ('train', 'val'):
    src = get_source('coco2014', root=str(tmp_path), split=split)
    assert src.class_names == expected['class_names']
    annotated = {k: v for k, v in expected[split].items() if v[0].any()}
    assert len(annotated) < len(expected[split])  # the fixture has unannotated images
    fx.check_records(src, annotated)
    # increasing image-id order
    assert [int(src[i]['id']) for i in range(len(src))] == sorted(map(int, annotated))
    all_src = get_source('coco2014', root=str(tmp_path), split=split, keep_all_negative=True)
    fx.check_records(all_src, expected[split])


def test_coco_subsets(tmp_path):
  fx.make_coco(str(tmp_path))
  full = get_source('coco2014', root=str(tmp_path), split='train')
  sub = get_source('coco2014', root=str(tmp_path), split='train', subset_size=2, subset_seed=3)
  again = get_source('coco2014', root=str(tmp_path), split='train', subset_size=2, subset_seed=3)
  ids = [sub[i]['id'] for i in range(2)]
  assert ids == [again[i]['id'] for i in range(2)]
  full_ids = [full[i]['id'] for i in range(len(full))]
  assert set(ids) <= set(full_ids) and ids == sorted(ids, key=full_ids.index)
  id_file = tmp_path / 'COCO_Subset_2_Ids.csv'
  id_file.write_text('2.500000000000000000e+01\n9.000000000000000000e+00\n')
  by_file = get_source('coco2014', root=str(tmp_path), split='train', subset_ids=str(id_file))
  assert [by_file[i]['id'] for i in range(len(by_file))] == ['25', '9']


def test_adp_drops_unlabelled_rows(tmp_path):
  expected = fx.make_adp(str(tmp_path))
  for split in ('train', 'valid', 'test'):
    src = get_source('adp', root=str(tmp_path), split=split)
    assert src.class_names == fx.ADP_L1
    fx.check_records(src, expected[split])
  assert len(get_source('adp', root=str(tmp_path), split='train', keep_all_negative=True)) == 7


def test_adp_release_folder_and_level_columns(tmp_path):
  release = tmp_path / 'ADP V1.0 Release'
  release.mkdir()
  fx.make_adp(str(release))
  src = get_source('adp', root=str(tmp_path), split='test')
  assert len(src) > 0
  with pytest.raises(ValueError, match=r"missing column\(s\).*'E.T'"):
    get_source('adp', root=str(tmp_path), split='test', level='L2')


def test_chestxray14_multi_folder_grey_and_no_finding(tmp_path):
  expected = fx.make_chestxray14(str(tmp_path))
  for split in ('train_val', 'test'):
    src = get_source('chestxray14', root=str(tmp_path), split=split)
    assert src.class_names == fx.CXR_CLASSES
    fx.check_records(src, expected[split], colour_check=False)
    for i in range(len(src)):
      img = src[i]['image']
      assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
      n = int(src[i]['id'].split('_')[0]) * 2 - 2 + int(src[i]['id'].split('_')[1][:3])
      grey = Image.new('RGB', (1, 1), fx.colour_of(n)).convert('L').getpixel((0, 0))
      assert abs(int(img[0, 0, 0]) - grey) <= 1
  negatives = [n for n, (lab, _) in expected['train_val'].items() if not lab.any()]
  assert negatives  # 'No Finding' rows exist and are kept
  kept = get_source('chestxray14', root=str(tmp_path), split='train_val', keep_all_negative=False)
  assert len(kept) == len(expected['train_val']) - len(negatives)


def test_chestxray14_patient_split_and_fraction(tmp_path):
  expected = fx.make_chestxray14(str(tmp_path))
  kw = dict(root=str(tmp_path), val_fraction=0.34, split_seed=1)
  train = get_source('chestxray14', split='train', **kw)
  val = get_source('chestxray14', split='val', **kw)
  train_ids = {train[i]['id'] for i in range(len(train))}
  val_ids = {val[i]['id'] for i in range(len(val))}
  assert train_ids | val_ids == set(expected['lists']['train_val'])
  assert not train_ids & val_ids and val_ids
  p = expected['patients']
  assert not {p[n] for n in train_ids} & {p[n] for n in val_ids}
  tenth = get_source('chestxray14', root=str(tmp_path), split='train_val', fraction=0.5)
  assert [tenth[i]['id'] for i in range(len(tenth))] == expected['lists']['train_val'][:6]


def test_synthetic_deterministic_disjoint_and_designed():
  a = get_source('synthetic', split='train', num_examples=300, seed=1)
  b = get_source('synthetic', split='train', num_examples=300, seed=1)
  t = get_source('synthetic', split='test', num_examples=300, seed=1)
  assert len(a.class_names) == 10 and len(set(a.class_names)) == 10
  np.testing.assert_array_equal(a[17]['image'], b[17]['image'])
  assert not np.array_equal(a[17]['image'], t[17]['image'])
  labels = np.stack([a[i]['labels'] for i in range(len(a))])
  counts = labels.sum(1)
  assert counts.min() >= 1 and counts.max() <= 4
  assert not (labels[:, 5] * labels[:, :2].max(1)).any()  # 5 never with group A
  assert not (labels[:, 6] * labels[:, 2:5].max(1)).any()  # 6 never with group B
  # group A co-occurs: P(1 | 0) far above P(1)
  assert labels[labels[:, 0] > 0, 1].mean() > 0.7 > 2 * labels[:, 1].mean()
  for i in range(20):  # every positive class's colour is visible in the image
    r = a[i]
    pixels = r['image'].reshape(-1, 3).astype(float)
    for k in np.flatnonzero(r['labels']):
      dist = np.abs(pixels - synthetic._class_colour(k)).max(1)
      assert (dist < 30).sum() > 10, (i, a.class_names[k])


def test_synthetic_other_sizes():
  s = get_source('synthetic', split='val', num_examples=5, image_size=32, num_classes=12)
  r = s[4]
  assert r['image'].shape == (32, 32, 3) and r['labels'].shape == (12,)
  assert len(set(s.class_names)) == 12
  with pytest.raises(IndexError):
    s[5]
  with pytest.raises(ValueError, match='num_classes must be >= 7'):
    get_source('synthetic', split='train', num_classes=6)


def test_tfds_voc_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  # TFDS imports its builders under etils' lazy-import hook, which rejects relative imports.
  # Garbage left by earlier tests (grain's multiprocessing semaphores, whose finalizers do
  # `from .resource_tracker import ...`) must not be collected inside it.
  gc.collect()
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    src = get_source('tfds', split='trainval', dataset='voc/2007')
    raw = tfds.data_source('voc/2007', split='train+validation')
    assert src.class_names == fx.VOC_CLASSES and len(src) == len(raw) == 6
    for i in range(len(src)):
      r, ex = src[i], raw[i]
      labels = np.zeros(20, np.float32)
      difficult = np.zeros(20, bool)
      for c in ex['labels_no_difficult']:
        labels[c] = 1
      for c in ex['labels']:
        difficult[c] = labels[c] == 0
      np.testing.assert_array_equal(r['labels'], labels)
      np.testing.assert_array_equal(r['difficult'], difficult)
      np.testing.assert_array_equal(r['image'], ex['image'])
      assert r['id'] == ex['image/filename']


def test_tfds_coco_mapper_drops_unannotated_fake_records():
  # TFDS's coco builder imports TensorFlow in `_info`, so mock_data cannot build it here;
  # the mapper and the drop-unannotated scan are tested on records shaped like TFDS coco/2014.
  rng = np.random.default_rng(0)
  records = []
  for n in range(7):
    k = 0 if n in (1, 4) else int(rng.integers(1, 4))
    records.append(
      {
        'image': np.full((5, 6, 3), n, np.uint8),
        'image/id': 100 + n,
        'image/filename': f'COCO_train2014_{100 + n:012d}.jpg',
        'objects': {
          'label': rng.integers(0, 80, k),
          'is_crowd': np.zeros(k, bool),
          'area': np.ones(k, np.int64),
          'bbox': np.zeros((k, 4)),
        },
      }
    )
  names = [f'c{i}' for i in range(80)]
  src = tfds_source.TfdsSource(
    records, dataset='coco/2014', class_names=names, description='fake', keep_all_negative=False
  )
  assert len(src) == 5
  for i, n in enumerate([0, 2, 3, 5, 6]):
    r = src[i]
    assert r['id'] == str(100 + n) and (r['image'] == n).all()
    assert set(np.flatnonzero(r['labels'])) == set(records[n]['objects']['label'].tolist())
  assert (
    len(
      tfds_source.TfdsSource(
        records, dataset='coco/2014', class_names=names, description='fake', keep_all_negative=True
      )
    )
    == 7
  )


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file.


def test_missing_roots_and_split_files(tmp_path):
  for name in ('voc2007', 'coco2014', 'adp', 'chestxray14'):
    with pytest.raises(FileNotFoundError, match='nowhere'):
      get_source(
        name, root=str(tmp_path / 'nowhere'), split='test' if name != 'coco2014' else 'val'
      )
  fx.make_voc(str(tmp_path / 'voc'))
  os.remove(tmp_path / 'voc/VOCdevkit/VOC2007/ImageSets/Main/test.txt')
  with pytest.raises(FileNotFoundError, match=r'Main/test\.txt'):
    get_source('voc2007', root=str(tmp_path / 'voc'), split='test')
  os.makedirs(tmp_path / 'coco/val2014')
  with pytest.raises(FileNotFoundError, match=r'instances_val2014\.json'):
    get_source('coco2014', root=str(tmp_path / 'coco'), split='val')
  fx.make_adp(str(tmp_path / 'adp'))
  os.remove(tmp_path / 'adp/splits/test.npy')
  with pytest.raises(FileNotFoundError, match=r'splits/test\.npy'):
    get_source('adp', root=str(tmp_path / 'adp'), split='test')
  fx.make_chestxray14(str(tmp_path / 'cxr'))
  os.remove(tmp_path / 'cxr/test_list.txt')
  with pytest.raises(FileNotFoundError, match=r'test_list\.txt'):
    get_source('chestxray14', root=str(tmp_path / 'cxr'), split='test')
  with pytest.raises(ValueError, match="unknown split 'testing'"):
    get_source('voc2007', root=str(tmp_path / 'voc'), split='testing')
  with pytest.raises(ValueError, match='Unknown dataset'):
    get_source('imagenet', root=str(tmp_path), split='train')


def test_missing_and_unreadable_images(tmp_path):
  fx.make_voc(str(tmp_path))
  images = tmp_path / 'VOCdevkit/VOC2007/JPEGImages'
  os.remove(images / '000002.jpg')
  data = (images / '000003.jpg').read_bytes()
  (images / '000003.jpg').write_bytes(data[: len(data) // 2])  # truncated
  (images / '000004.jpg').write_bytes(b'this is not an image')
  src = get_source('voc2007', root=str(tmp_path), split='trainval')
  with pytest.raises(FileNotFoundError, match='000002.jpg'):
    src[1]
  for index, name in ((2, '000003.jpg'), (3, '000004.jpg')):
    for size in (None, 16):
      with pytest.raises(UnreadableImageError, match=name):
        get_source('voc2007', root=str(tmp_path), split='trainval', decode_size=size)[index]
  png = tmp_path / 'x.png'
  Image.new('RGB', (64, 64), (1, 2, 3)).save(png)
  png.write_bytes(png.read_bytes()[:60])
  with pytest.raises(UnreadableImageError, match='x.png'):
    decode_image(str(png))


def test_csv_without_expected_columns(tmp_path):
  fx.make_adp(str(tmp_path / 'adp'))
  path = tmp_path / 'adp/ADP_EncodedLabels_Release1_Flat.csv'
  path.write_text(path.read_text().replace('Patch Names', 'Patch'))
  with pytest.raises(ValueError, match="ADP_EncodedLabels_Release1_Flat.csv.*'Patch Names'"):
    get_source('adp', root=str(tmp_path / 'adp'), split='train')
  fx.make_chestxray14(str(tmp_path / 'cxr'))
  path = tmp_path / 'cxr/Data_Entry_2017.csv'
  path.write_text(path.read_text().replace('Finding Labels', 'Findings'))
  with pytest.raises(ValueError, match="Data_Entry_2017.csv.*'Finding Labels'"):
    get_source('chestxray14', root=str(tmp_path / 'cxr'), split='test')


def test_label_files_with_unknown_values(tmp_path):
  fx.make_voc(str(tmp_path / 'voc'))
  path = tmp_path / 'voc/VOCdevkit/VOC2007/ImageSets/Main/cat_test.txt'
  lines = path.read_text().splitlines()
  lines[2] = lines[2].split()[0] + ' 2'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r'cat_test\.txt:3'):
    get_source('voc2007', root=str(tmp_path / 'voc'), split='test')
  fx.make_chestxray14(str(tmp_path / 'cxr'))
  path = tmp_path / 'cxr/Data_Entry_2017.csv'
  path.write_text(path.read_text().replace('No Finding', 'Pneumonia|Flu', 1))
  with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv:\d+: unknown finding 'Flu'"):
    get_source('chestxray14', root=str(tmp_path / 'cxr'), split='test')
  fx.make_adp(str(tmp_path / 'adp'))
  path = tmp_path / 'adp/ADP_EncodedLabels_Release1_Flat.csv'
  text = path.read_text().splitlines()
  text[3] = text[3].rsplit(',', 2)[0] + ',2,0'
  path.write_text('\n'.join(text) + '\n')
  with pytest.raises(ValueError, match=r'Flat\.csv:4: label values must be 0 or 1'):
    get_source('adp', root=str(tmp_path / 'adp'), split='train')


def test_empty_splits(tmp_path):
  fx.make_voc(str(tmp_path / 'voc'))
  (tmp_path / 'voc/VOCdevkit/VOC2007/ImageSets/Main/test.txt').write_text('')
  with pytest.raises(ValueError, match=r'test\.txt is empty'):
    get_source('voc2007', root=str(tmp_path / 'voc'), split='test')
  fx.make_chestxray14(str(tmp_path / 'cxr'))
  (tmp_path / 'cxr/test_list.txt').write_text('\n')
  with pytest.raises(ValueError, match=r'test_list\.txt: empty split list'):
    get_source('chestxray14', root=str(tmp_path / 'cxr'), split='test')
  fx.make_adp(str(tmp_path / 'adp'))
  np.save(tmp_path / 'adp/splits/valid.npy', np.array([2, 7]))  # only unlabelled rows
  with pytest.raises(ValueError, match='adp L1 valid .* empty after selection'):
    get_source('adp', root=str(tmp_path / 'adp'), split='valid')


@pytest.mark.parametrize(
  'mode,colour', [('RGB', (200, 30, 60)), ('L', 77), ('CMYK', (10, 200, 30, 5))]
)
def test_decode_jpeg_modes_match_pil(tmp_path, mode, colour):
  path = str(tmp_path / 'x.jpg')
  Image.new(mode, (40, 30), colour).save(path, quality=95)
  out = decode_image(path)
  ref = np.asarray(Image.open(path).convert('RGB'))
  assert out.shape == (30, 40, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - ref).max() <= 2


def test_tfds_unprepared_dataset_names_the_expected_directory(tmp_path):
  # coco/2014's TFDS builder needs TensorFlow; without it the prepared directory is used, and
  # a missing one is reported with the path and the command that prepares it.
  with pytest.raises(FileNotFoundError, match=r'coco/2014/<version>.*tfds build coco/2014'):
    get_source('tfds', root=str(tmp_path), split='train', dataset='coco/2014')


def test_decode_16bit_png_scales_to_8bit(tmp_path):
  values = np.array([[0, 1000], [2000, 4000]], np.uint16)
  path = str(tmp_path / 'x.png')
  Image.fromarray(values).save(path)
  out = decode_image(path)
  np.testing.assert_array_equal(out[..., 0], np.round(values / 4000 * 255).astype(np.uint8))
  assert (out[..., 0] == out[..., 2]).all()


def test_holdout_split_is_disjoint_covering_and_seeded():
  source = get_source('synthetic', split='train', num_examples=40)
  rest, held = holdout_split(source, 0.1, seed=3)
  ids = lambda s: [s[i]['id'] for i in range(len(s))]
  assert len(held) == 4 and len(rest) == 36
  assert sorted(ids(rest) + ids(held)) == sorted(ids(source))
  assert ids(holdout_split(source, 0.1, seed=3)[1]) == ids(held)
  assert ids(holdout_split(source, 0.1, seed=4)[1]) != ids(held)
  assert held.class_names == source.class_names
  with pytest.raises(ValueError, match='fraction'):
    holdout_split(source, 1.5, seed=0)


def test_text_files_with_bom_crlf_and_trailing_spaces(tmp_path):
  # Every label and list file rewritten as a Windows spreadsheet may save it.
  expected = fx.make_voc(str(tmp_path / 'voc'))
  for name in os.listdir(tmp_path / 'voc/VOCdevkit/VOC2007/ImageSets/Main'):
    fx.make_messy(str(tmp_path / 'voc/VOCdevkit/VOC2007/ImageSets/Main' / name))
  for split in ('trainval', 'test'):
    fx.check_records(
      get_source('voc2007', root=str(tmp_path / 'voc'), split=split), expected[split]
    )
  expected = fx.make_coco(str(tmp_path / 'coco'))
  fx.make_messy(str(tmp_path / 'coco/annotations/instances_train2014.json'))
  ids = tmp_path / 'ids.csv'
  ids.write_text('25\n9\n')
  fx.make_messy(str(ids))
  src = get_source('coco2014', root=str(tmp_path / 'coco'), split='train', subset_ids=str(ids))
  fx.check_records(src, {k: expected['train'][k] for k in ('25', '9')})
  expected = fx.make_adp(str(tmp_path / 'adp'))
  fx.make_messy(str(tmp_path / 'adp/ADP_EncodedLabels_Release1_Flat.csv'))
  fx.check_records(get_source('adp', root=str(tmp_path / 'adp'), split='train'), expected['train'])
  expected = fx.make_chestxray14(str(tmp_path / 'cxr'))
  for name in ('Data_Entry_2017.csv', 'train_val_list.txt', 'test_list.txt'):
    fx.make_messy(str(tmp_path / 'cxr' / name))
  for split in ('train_val', 'test'):
    fx.check_records(
      get_source('chestxray14', root=str(tmp_path / 'cxr'), split=split),
      expected[split],
      colour_check=False,
    )


def test_label_file_not_utf8_names_file_and_line(tmp_path):
  fx.make_chestxray14(str(tmp_path))
  path = tmp_path / 'Data_Entry_2017.csv'
  lines = path.read_bytes().split(b'\n')
  lines[3] = lines[3].replace(b',M,', b',M\xe9,')  # a Latin-1 byte
  path.write_bytes(b'\n'.join(lines))
  with pytest.raises(ValueError, match=r'Data_Entry_2017\.csv: line 4 is not UTF-8 text'):
    get_source('chestxray14', root=str(tmp_path), split='test')


def test_anything_but_an_image_is_an_unreadable_image_error(tmp_path):
  jpeg = tmp_path / 'ok.jpg'
  Image.new('RGB', (40, 30), (1, 2, 3)).save(jpeg, quality=95)
  png = tmp_path / 'ok.png'
  Image.new('RGB', (40, 30), (1, 2, 3)).save(png)
  garbage = np.random.default_rng(0).integers(0, 256, 600, np.uint8).tobytes()
  cases = {
    'empty.jpg': b'',
    'truncated.jpg': jpeg.read_bytes()[:300],
    'truncated.png': png.read_bytes()[:60],
    'garbage.png': garbage,
    'jpeg_magic_garbage.jpg': b'\xff\xd8' + garbage,
    'text.jpg': b'not an image\n',
  }
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
  (tmp_path / 'folder.jpg').mkdir()
  for name in [*cases, 'folder.jpg']:
    for size in (None, 16):
      with pytest.raises(UnreadableImageError, match=re.escape(str(tmp_path / name))):
        decode_image(str(tmp_path / name), decode_size=size)
  with pytest.raises(UnreadableImageError, match='is a directory'):
    decode_image(str(tmp_path / 'folder.jpg'))


def test_skip_unreadable_skips_directories_and_empty_files(tmp_path):
  fx.make_voc(str(tmp_path), n_trainval=4, n_test=1)
  images = tmp_path / 'VOCdevkit/VOC2007/JPEGImages'
  os.remove(images / '000002.jpg')
  (images / '000002.jpg').mkdir()
  (images / '000003.jpg').write_bytes(b'')
  src = get_source('voc2007', root=str(tmp_path), split='trainval')
  it = pipeline.train_iterator(
    src,
    batch_size=2,
    image_size=16,
    augment='none',
    seed=0,
    shard_index=0,
    shard_count=1,
    skip_unreadable=True,
  )
  batch = next(it)
  it.close()
  assert batch['image'].shape == (2, 16, 16, 3)
  with pytest.raises(UnreadableImageError, match=r'000002\.jpg: it is a directory'):
    src[1]


def test_options_the_dataset_does_not_accept(tmp_path):
  fx.make_adp(str(tmp_path))
  with pytest.raises(
    ValueError,
    match=r"^dataset\.options\.levle \(did you mean 'level'\?\): "
    r"not an option of dataset 'adp', which accepts decode_size, fraction, "
    r'keep_all_negative, level, subset_seed, subset_size$',
  ):
    get_source('adp', root=str(tmp_path), split='train', levle='L2')
  with pytest.raises(ValueError, match=r"dataset\.options\.decode_size: .* 'synthetic'"):
    get_source('synthetic', split='train', decode_size=64)
  with pytest.raises(ValueError, match=r"^dataset\.options\.dataset: required by dataset 'tfds'"):
    get_source('tfds', split='train')
  assert accepted_options('voc2007') == {
    'decode_size': None,
    'keep_all_negative': True,
    'fraction': None,
    'subset_size': None,
    'subset_seed': 0,
  }
