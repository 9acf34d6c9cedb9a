import os
import time

from pathways_mm.runtime import engine


def test_a_lock_left_by_a_killed_build_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some_op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    engine._warn_stale_build_lock("some_op")  # a build that may still be running: nothing said
    assert capsys.readouterr().err == ""
    old = time.time() - 3600
    os.utime(lock, (old, old))
    engine._warn_stale_build_lock("some_op")
    err = capsys.readouterr().err
    assert str(lock) in err and "60 minutes ago" in err and "delete it" in err
    lock.unlink()
    engine._warn_stale_build_lock("some_op")
    assert capsys.readouterr().err == ""
