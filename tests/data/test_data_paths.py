import pytest

from asap.data import DEFAULT_DATA_ENV, resolve_data_dir


def test_option_wins_over_environment(tmp_path, monkeypatch):
    option, env = tmp_path / "option", tmp_path / "env"
    option.mkdir()
    env.mkdir()
    monkeypatch.setenv(DEFAULT_DATA_ENV, str(env))
    assert resolve_data_dir(option) == option
    assert resolve_data_dir(str(option)) == option


def test_environment_used_without_option(tmp_path, monkeypatch):
    monkeypatch.setenv(DEFAULT_DATA_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


def test_neither_given_names_both_ways(monkeypatch):
    monkeypatch.delenv(DEFAULT_DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir(None)
    assert "data_dir" in str(info.value) and DEFAULT_DATA_ENV in str(info.value)


@pytest.mark.parametrize("source", ["option", "env"])
def test_missing_directory_is_named(tmp_path, monkeypatch, source):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DEFAULT_DATA_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_data_dir(missing if source == "option" else None)


def test_a_file_is_not_a_data_directory(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_data_dir(file)
