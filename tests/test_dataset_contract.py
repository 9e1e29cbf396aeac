"""Every dataset in the registry, pointed at a data root without its files (and no --download): a one-line
`ConfigError` that names where it looked (the root's path) or the data.* key to set, and nothing written
into the root. Parametrised over `longtail.data.dataset_names()`, so a dataset registered there is covered
without editing this file."""
import pytest

from longtail.config import load_config
from longtail.data import build_data, dataset_names
from longtail.errors import ConfigError


@pytest.mark.parametrize("name", dataset_names())
def test_every_dataset_names_what_is_missing_in_one_line(name, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_data(load_config(None, [f"data.name={name}"]).data, tmp_path)
    message = str(error.value)
    assert "\n" not in message and (str(tmp_path) in message or "data." in message), message
    assert list(tmp_path.iterdir()) == []
