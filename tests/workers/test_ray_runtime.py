"""Ray runtime helpers (the local Ray itself is exercised by the flow integration tests)."""

from pathlib import Path

from workers.ray_runtime import MAX_TEMP_DIR_CHARS, ray_temp_dir


def test_short_temp_dir_is_kept(tmp_path: Path) -> None:
    short = Path("/tmp/fl-r")
    assert ray_temp_dir(short) == short


def test_long_temp_dir_maps_to_a_stable_short_one() -> None:
    long = Path("/tmp") / ("x" * 80) / "ray"
    mapped = ray_temp_dir(long)
    assert len(str(mapped)) <= MAX_TEMP_DIR_CHARS
    assert mapped == ray_temp_dir(long) and mapped != ray_temp_dir(long.parent / "other")
