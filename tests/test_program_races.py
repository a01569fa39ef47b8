"""The race check of the interpreted kernel tests (``tests/program_races.py``) finds planted races between the
programs of one launch and passes launches without them."""

from __future__ import annotations

from pathlib import Path

from triton_interpreter import interpreted_report


def test_race_check_finds_planted_races_and_only_them():
    cases = {case["name"]: case["races"] for case in interpreted_report(Path(__file__).with_name("program_races_interpret_check.py"), timeout=300)["cases"]}
    assert cases["own_slots"] == []  # each program reads back only what it wrote itself
    assert cases["masked_overlap"] == []  # a store whose mask is off touches nothing
    (neighbour,) = cases["neighbour_read"]
    assert "written by one program and read by another" in neighbour and "b_ptr[byte 32]" in neighbour
    assert "96 bytes" in neighbour  # programs 1-3 write 8 floats each that programs 0-2 read
    (same,) = cases["same_slot"]
    assert "written by more than one program" in same and "b_ptr[byte 0]" in same and "32 bytes" in same
    (partial,) = cases["one_byte"]
    assert "6 bytes written by more than one program" in partial  # a 2-byte bf16 store into a float32 slot, 3 times
