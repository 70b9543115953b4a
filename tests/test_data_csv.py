"""The generic csv source (`dataset.name='csv'`): both csv forms, options, and every bad input."""

import os
import re

import data_fixtures as fx
import numpy as np
import pytest

from kmcl_jax.data import get_source


def _open(root, split='train', **options):
  return get_source('csv', root=str(root), split=split, **options)


def test_label_names_share_one_sorted_class_list_over_all_splits(tmp_path):
  expected = fx.make_csv(str(tmp_path))
  for split in ('train', 'val', 'test'):
    src = _open(tmp_path, split)
    assert src.class_names == fx.CSV_CLASSES  # 'zebra' is only in test.csv
    fx.check_records(src, expected[split])
  assert [r['id'] for r in (_open(tmp_path)[i] for i in range(5))] == [
    image for image, _ in fx.CSV_ROWS['train']
  ]


def test_zero_one_columns_in_column_order(tmp_path):
  columns = ('person', 'zebra', 'cat', 'dog')
  expected = fx.make_csv(str(tmp_path), columns=columns)
  for split in ('train', 'test'):
    src = _open(tmp_path, split)
    assert src.class_names == columns
    fx.check_records(src, expected[split])
  (tmp_path / 'classes.txt').write_text('dog\ncat\n')  # picks and orders class columns
  src = _open(tmp_path, classes_file='classes.txt')
  assert src.class_names == ('dog', 'cat')
  np.testing.assert_array_equal(src[0]['labels'], [1, 1])


def test_classes_file_file_pattern_and_delimiter(tmp_path):
  fx.make_csv(str(tmp_path))
  os.makedirs(tmp_path / 'lists')
  (tmp_path / 'lists/train_pipe.csv').write_text(
    'image,labels,notes\nimages/001.jpg,dog| cat,x\nimages/002.jpg,,y\n'
  )
  (tmp_path / 'classes.txt').write_text('dog\ncat\n\nbird\n')
  src = _open(
    tmp_path, csv_file='lists/{split}_pipe.csv', classes_file='classes.txt', label_delimiter='|'
  )
  assert src.class_names == ('dog', 'cat', 'bird') and len(src) == 2
  np.testing.assert_array_equal(src[0]['labels'], [1, 1, 0])
  np.testing.assert_array_equal(src[1]['labels'], [0, 0, 0])
  assert len(_open(tmp_path, keep_all_negative=False)) == 4


def test_spreadsheet_exports_read_like_clean_files(tmp_path):
  expected = fx.make_csv(str(tmp_path))
  for split in ('train', 'val', 'test'):
    path = tmp_path / f'{split}.csv'
    text = path.read_text().replace(',', ' , ').replace('images/', 'images\\')
    path.write_text(text + '\n,\n')  # blank rows, as spreadsheets write them
    fx.make_messy(str(path))
    assert path.read_bytes().startswith(b'\xef\xbb\xbf') and b'\r\n' in path.read_bytes()
  for split in ('train', 'val', 'test'):
    fx.check_records(_open(tmp_path, split), expected[split])


def _edit(path, row: int, text: str | None):
  """Replaces (or, with None, deletes) line `row` (1-based, header = 1) of a csv file."""
  lines = path.read_text().splitlines()
  if text is None:
    del lines[row - 1]
  else:
    lines[row - 1] = text
  path.write_text('\n'.join(lines) + '\n')


BAD_CSV = {
  'unknown label': (
    lambda p: _edit(p, 3, 'images/002.jpg,person dgo'),
    {'classes_file': 'classes.txt'},
    ValueError,
    "{csv}, row 3, column 'labels': unknown label 'dgo'; {root}/classes.txt "
    'lists cat, dog, person, zebra',
  ),
  'missing image': (
    lambda p: os.remove(p.parent / 'images/004.jpg'),
    {},
    FileNotFoundError,
    "{csv}, row 5, column 'image': image file {root}/images/004.jpg not found",
  ),
  'image is a directory': (
    lambda p: _edit(p, 3, 'images,person'),
    {},
    FileNotFoundError,
    "{csv}, row 3, column 'image': image file {root}/images is a directory, not an image file",
  ),
  'empty label set': (
    lambda p: None,
    {'allow_empty': False},
    ValueError,
    "{csv}, row 4, column 'labels': no label, and dataset.options.allow_empty=False (set it "
    'to True if images without any positive label are intended)',
  ),
  'duplicate image': (
    lambda p: _edit(p, 6, './images/002.jpg,dog'),
    {},
    ValueError,
    "{csv}, row 6, column 'image': ./images/002.jpg is already in row 3 (each image once, "
    'with all its labels)',
  ),
  'long row': (
    lambda p: _edit(p, 2, 'images/001.jpg,dog,cat'),
    {},
    ValueError,
    '{csv}, row 2, column 3: the row has 3 cells but the header has 2 (image, labels); a '
    'cell that contains a comma must be in double quotes',
  ),
  'short row': (
    lambda p: _edit(p, 2, 'images/001.jpg'),
    {},
    ValueError,
    "{csv}, row 2, column 'labels': missing; the row has 1 cell(s) but the header has 2 "
    '(image, labels)',
  ),
  'empty image cell': (
    lambda p: _edit(p, 4, ',dog'),
    {},
    ValueError,
    "{csv}, row 4, column 'image': empty; expected an image path relative to {root}",
  ),
  'no image column': (
    lambda p: _edit(p, 1, 'file,labels'),
    {},
    ValueError,
    "{csv}, row 1: no 'image' column in the header ['file', 'labels']; expected 'image' and "
    "either 'labels' (label names) or one 0/1 column per class",
  ),
  'repeated column': (
    lambda p: _edit(p, 1, 'image,labels,labels'),
    {},
    ValueError,
    "{csv}, row 1, column 'labels': the column name appears twice in the header",
  ),
  'empty file': (
    lambda p: p.write_text(''),
    {},
    ValueError,
    "{csv}: empty file; expected a header row with an 'image' column and either a 'labels' "
    'column or one 0/1 column per class',
  ),
  'header only': (
    lambda p: p.write_text('image,labels\n\n'),
    {},
    ValueError,
    '{csv}: no data rows after the header',
  ),
  'not utf-8': (
    lambda p: p.write_bytes(p.read_bytes().replace(b'person', b'p\xe9rson', 1)),
    {},
    ValueError,
    '{csv}: line 3 is not UTF-8 text (byte 0xe9); save the file with UTF-8 '
    'encoding (e.g. "CSV UTF-8" in a spreadsheet)',
  ),
  'missing split file': (
    lambda p: os.remove(p),
    {},
    FileNotFoundError,
    "csv dataset: no file for split 'train': expected {csv} (found ['test.csv', 'val.csv'])",
  ),
}


@pytest.mark.parametrize('case', sorted(BAD_CSV))
def test_bad_label_names_csv_gives_one_message(tmp_path, case):
  fx.make_csv(str(tmp_path))
  (tmp_path / 'classes.txt').write_text('\n'.join(fx.CSV_CLASSES) + '\n')
  edit, options, error, message = BAD_CSV[case]
  edit(tmp_path / 'train.csv')
  message = message.format(csv=tmp_path / 'train.csv', root=tmp_path)
  with pytest.raises(error, match=f'^{re.escape(message)}$'):
    _open(tmp_path, **options)


BAD_COLUMNS = {
  'value not 0/1': (
    lambda p: _edit(p, 3, 'images/002.jpg,1,2'),
    {},
    ValueError,
    "{csv}, row 3, column 'dog': expected 0 or 1, got '2'",
  ),
  'empty 0/1 cell': (
    lambda p: _edit(p, 3, 'images/002.jpg,1,'),
    {},
    ValueError,
    "{csv}, row 3, column 'dog': expected 0 or 1, got ''",
  ),
  'all zero': (
    lambda p: None,
    {'allow_empty': False},
    ValueError,
    "{csv}, row 3, columns 'cat' to 'dog': no label, and dataset.options.allow_empty=False "
    '(set it to True if images without any positive label are intended)',
  ),
  'class not a column': (
    lambda p: None,
    {'classes_file': 'classes.txt'},
    ValueError,
    "{csv}, row 1: no column for class(es) ['person', 'zebra'] of {root}/classes.txt "
    "(header: ['image', 'cat', 'dog'])",
  ),
  'empty column name': (
    lambda p: _edit(p, 1, 'image,cat,'),
    {},
    ValueError,
    '{csv}, row 1, column 3: empty column name; in the 0/1 form every column after the image '
    'names a class',
  ),
  'repeated class line': (
    lambda p: (p.parent / 'classes.txt').write_text('cat\ndog\ncat\n'),
    {'classes_file': 'classes.txt'},
    ValueError,
    "{root}/classes.txt, line 3: class 'cat' is already on line 1",
  ),
}


@pytest.mark.parametrize('case', sorted(BAD_COLUMNS))
def test_bad_zero_one_csv_gives_one_message(tmp_path, case):
  fx.make_csv(str(tmp_path), columns=('cat', 'dog'))
  (tmp_path / 'classes.txt').write_text('\n'.join(fx.CSV_CLASSES) + '\n')
  edit, options, error, message = BAD_COLUMNS[case]
  edit(tmp_path / 'train.csv')
  message = message.format(csv=tmp_path / 'train.csv', root=tmp_path)
  with pytest.raises(error, match=f'^{re.escape(message)}$'):
    _open(tmp_path, **options)


def test_unknown_option_lists_the_accepted_ones(tmp_path):
  fx.make_csv(str(tmp_path))
  with pytest.raises(
    ValueError,
    match=r'dataset\.options\.label_delimeter \(did you mean '
    r"'label_delimiter'\?\): not an option of dataset 'csv', which accepts "
    r'allow_empty, classes_file, csv_file, decode_size, fraction, ',
  ):
    _open(tmp_path, label_delimeter='|')
