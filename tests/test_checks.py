"""The shared checks at the door: one message style, `where: problem (fix)`, for numbers, paths, devices."""
import math

import pytest

from clip_core.checks import (
    check_device, check_file, check_folder, check_out_folder, finite_number, fraction, whole_number,
)
from clip_core.errors import InputError


@pytest.mark.parametrize("value, ok", [(1, True), (7, True), (0, False), (-5, False), (2.0, False),
                                       (True, False), (None, False), ("3", False)])
def test_whole_number(value, ok):
    if ok:
        assert whole_number("--n", value) == value
    else:
        with pytest.raises(InputError, match=rf"^--n: must be a whole number >= 1, got {value!r}"):
            whole_number("--n", value)


def test_whole_number_bounds_and_fix():
    with pytest.raises(InputError) as caught:
        whole_number("-k", 0)
    assert str(caught.value) == "-k: must be a whole number >= 1, got 0 (pass -k 1 or more)"
    with pytest.raises(InputError) as caught:
        whole_number("--encode-quality", 101, 0, 100)
    assert str(caught.value) == ("--encode-quality: must be a whole number >= 0 and <= 100, got 101 "
                                 "(pass --encode-quality from 0 to 100)")
    with pytest.raises(InputError) as caught:
        whole_number("--seed", -1, 0, fix="the seed of the draws")
    assert (caught.value.where, caught.value.fix) == ("--seed", "the seed of the draws")
    assert whole_number("--sheet-size", 0, 0) == 0 and whole_number("--q", 100, 0, 100) == 100


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_finite_number_refuses(value):
    with pytest.raises(InputError, match=rf"^--min-pmi: must be a finite number, got {value!r}"):
        finite_number("--min-pmi", value)


def test_finite_number_returns_a_float_and_takes_a_lower_bound():
    assert finite_number("--min-pmi", -3) == -3.0 and isinstance(finite_number("x", 2), float)
    assert finite_number("--timeout", 0.5, above=0) == 0.5
    with pytest.raises(InputError) as caught:
        finite_number("--lr", 0, "pass --lr 2e-3", above=0)
    assert str(caught.value) == "--lr: must be a finite number > 0, got 0 (pass --lr 2e-3)"


@pytest.mark.parametrize("value", [0, -0.5, 1.01, True, math.nan, "0.9"])
def test_fraction_refuses(value):
    with pytest.raises(InputError, match=r"^--precision: must be in \(0, 1\], got .* \(pass a value such as "
                                         r"--precision 0.99\)$"):
        fraction("--precision", value)


def test_fraction_accepts_the_half_open_interval():
    assert fraction("--precision", 1) == 1.0 and fraction("--precision", 0.99) == 0.99


def test_folder_and_file_checks_name_the_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    afile, nowhere = str(tmp_path / "afile"), str(tmp_path / "nowhere")
    check_out_folder("--out", str(tmp_path / "new" / "deeper"))  # created later: fine
    check_folder("--eval", str(tmp_path))
    check_file("--matches", afile)
    cases = [
        (lambda: check_out_folder("--out", afile), rf"^--out: {afile} is a file, not a folder"),
        (lambda: check_out_folder("--out", afile + "/sub"), rf"^--out: {afile} is a file, so {afile}/sub cannot"),
        (lambda: check_folder("--init", afile, "detector folder"),
         rf"^--init: {afile} is a file, not a detector folder \(pass the detector folder\)$"),
        (lambda: check_folder("--init", nowhere, "detector folder"), rf"^--init: no detector folder at {nowhere}"),
        (lambda: check_file("--matches", str(tmp_path)), rf"^--matches: {tmp_path} is a folder, not a file"),
        (lambda: check_file("--matches", nowhere), rf"^--matches: no file at {nowhere} \(check the path\)$"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


def test_check_device():
    assert check_device("--device", None) is None and check_device("--device", "cpu") == "cpu"
    with pytest.raises(InputError, match=r"^--device: unknown device 'gpu' \(pass cpu, cuda or cuda:N\)$"):
        check_device("--device", "gpu")
    with pytest.raises(InputError, match=r"^--device: unknown device 'cuda:x'"):
        check_device("--device", "cuda:x")
    with pytest.raises(InputError, match=r"^--device: cuda:99 is not available here \(\d+ CUDA devices\) \(pass cpu"):
        check_device("--device", "cuda:99")
