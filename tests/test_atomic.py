"""lightning_sae.atomic: the one way the library writes files and directories (whole or absent)."""

from __future__ import annotations

import pytest

from lightning_sae.atomic import atomic_directory, atomic_write, atomic_write_text


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "deep" / "file.json", "first")
    assert target.read_text() == "first"

    def half_then_fail(handle):
        handle.write(b"sec")
        raise KeyboardInterrupt  # stopped midway

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
    atomic_write(target, lambda handle: handle.write(b"second"))
    assert target.read_text() == "second" and len(list(target.parent.iterdir())) == 1


def test_a_directory_replaces_its_target_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sae"
    with atomic_directory(target) as directory:
        (directory / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as directory:
            (directory / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["sae"]
    with atomic_directory(target) as directory:
        (directory / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_keep_existing_lets_the_first_finisher_win(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target, keep_existing=True) as first:
        with atomic_directory(target, keep_existing=True) as second:
            (second / "weights").write_text("second")
        (first / "weights").write_text("first")  # finishes after `second`: dropped
    assert (target / "weights").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_weights_and_configs_get_the_same_ordinary_file_mode(tmp_path, umask):
    """safetensors writes its files 0600; cfg.json beside them gets open()'s 0666 less the umask.
    Every file of an exported SAE must get the latter, whatever the umask."""
    import os
    import stat

    from lightning_sae.formats import save_saelens, save_sparsify
    from lightning_sae.sae import TopKSAE

    previous = os.umask(umask)
    try:
        sae = TopKSAE(8, 32, 4, seed=0)
        written = [save_saelens(sae, tmp_path / "saelens"), save_sparsify(sae, tmp_path / "sparsify", "layers.0"),
                   atomic_write_text(tmp_path / "plain.json", "{}").parent]
        with atomic_directory(tmp_path / "nested") as directory:
            (directory / "inner").mkdir()
            (directory / "inner" / "file").write_text("x")
    finally:
        os.umask(previous)
    files = [path for root in (*written, tmp_path / "nested") for path in root.rglob("*") if path.is_file()]
    assert len(files) >= 6
    modes = {str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode) for path in files}
    assert set(modes.values()) == {0o666 & ~umask}, modes
