"""A user error raised in a DataLoader worker reaches the user as the same one line, fields intact."""

import pytest
from torch.utils.data import DataLoader, Dataset

from zoo.errors import CarriedUserError, UserError
from zoo.training.data_workers import one_line_errors
from zoo.training.worker_errors import user_errors_cross_workers


def _bad_item() -> UserError:
    return UserError("cannot read image x.png: truncated\nsecond line", file="data/x.png", line=3,
                     key_path="data.root", suggestion="delete or replace the file")


class _Decorated(Dataset):
    def __len__(self) -> int:
        return 4

    @user_errors_cross_workers
    def __getitem__(self, index: int) -> int:
        if index == 2:
            raise _bad_item()
        return index


class _PluginDataset(_Decorated):
    """A dataset that does not decorate its ``__getitem__`` (another package's)."""

    def __getitem__(self, index: int) -> int:
        raise UserError("plugin data is missing", suggestion="run its download step")


def _first_error(dataset: Dataset, workers: int) -> UserError:
    loader = DataLoader(dataset, batch_size=1, num_workers=workers)
    with pytest.raises(UserError) as caught:
        list(one_line_errors(iter(loader)))
    return caught.value


@pytest.mark.parametrize("workers", [0, 1])
def test_the_error_keeps_its_message_location_and_hint(workers):
    err, want = _first_error(_Decorated(), workers), _bad_item()
    assert (err.message, err.file, err.line, err.key_path, err.suggestion) == \
        (want.message, want.file, want.line, want.key_path, want.suggestion)
    assert str(err) == str(want) and "Traceback" not in str(err)
    assert type(err) is (UserError if workers == 0 else CarriedUserError)  # in-process: untouched


def test_an_undecorated_dataset_s_error_is_its_last_line():
    err = _first_error(_PluginDataset(), 1)
    assert str(err) == "plugin data is missing (run its download step)"


def test_text_without_the_fields_is_an_ordinary_message():
    """Rebuilt from text whose marker is followed by anything but the fields, the text is the message."""
    text = CarriedUserError._MARK + '{"message": 1}'
    assert CarriedUserError(text).message == text and CarriedUserError("plain").suggestion is None
