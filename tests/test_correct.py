"""Dark/flat correction and block averaging (stream/correct.py) against plain-numpy oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream.correct import Corrector, References, normalize, warmup
from stream.frame import Frame

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAPE = (8, 6)


def make_frame(kind: str, image: np.ndarray, seq: int = 0, energy_ev: float = 8000.0,
               exposure_s: float = 0.1, moving: bool = False) -> Frame:
    return Frame(seq=seq, t_ns=1_000_000 * seq, kind=kind, image=image, exposure_s=exposure_s,
                 energy_ev=energy_ev, moving=moving)


def reference_stacks(rng: np.random.Generator, shape=SHAPE, n: int = 3):
    """Integer darks (~100 counts) and flats (~2000 counts), uint16."""
    darks = rng.integers(90, 110, (n, *shape)).astype(np.uint16)
    flats = rng.integers(1500, 2500, (n, *shape)).astype(np.uint16)
    return darks, flats


def loaded_references(darks, flats, n_frames=None, min_denominator=1.0, **key) -> References:
    refs = References(n_frames or max(len(darks), len(flats)), min_denominator)
    for k, image in enumerate(darks):
        refs.add(make_frame("dark", image, seq=k, **key))
    for k, image in enumerate(flats):
        refs.add(make_frame("flat", image, seq=k, **key))
    return refs


def oracle_blocks(raws, darks, flats, n_avg):
    """Plain-numpy float32 correction of each frame, then block means (same rounding steps)."""
    dark = np.mean(darks, axis=0, dtype=np.float32)
    denominator = np.mean(flats, axis=0, dtype=np.float32) - dark
    corrected = [(raw.astype(np.float32) - dark) / denominator for raw in raws]
    blocks = []
    for start in range(0, len(raws), n_avg):
        part = corrected[start:start + n_avg]
        acc = part[0].copy()
        for image in part[1:]:
            acc += image
        blocks.append(acc * np.float32(1.0 / len(part)) if len(part) > 1 else acc)
    return blocks


def test_warmup_compiles_without_error():
    warmup()


@pytest.mark.parametrize("dtype", ["u1", "u2", "u4", "i4", "f4"])
@pytest.mark.parametrize("n_avg", [1, 3, 4])
@pytest.mark.parametrize("read_only", [False, True])
def test_corrector_matches_numpy_oracle(dtype, n_avg, read_only):
    rng = np.random.default_rng(1)
    darks, flats = reference_stacks(rng)
    raws = [rng.integers(100, 250, SHAPE).astype(dtype) for _ in range(2 * n_avg)]
    for raw in raws:
        raw.setflags(write=not read_only)  # frames from the wire are read-only views
    corrector = Corrector(loaded_references(darks, flats), average_frames=n_avg)
    got = []
    for seq, raw in enumerate(raws):
        got += [(p, p.image.copy()) for p in corrector.push(make_frame("data", raw, seq=seq))]
    expected = oracle_blocks(raws, darks, flats, n_avg)
    assert len(got) == len(expected) == 2
    for (block, image), want in zip(got, expected, strict=True):
        assert image.dtype == np.float32 and image.shape == SHAPE
        np.testing.assert_allclose(image, want, rtol=1e-6, atol=0)
        assert block.corrected and block.flags == [] and block.n_frames == n_avg
    # the physics in float64: the mean of (raw - dark) / (flat - dark) over each block
    dark64, flat64 = darks.mean(0), flats.mean(0)
    for k, (_, image) in enumerate(got):
        raw64 = np.mean([r.astype(np.float64) for r in raws[k * n_avg:(k + 1) * n_avg]], axis=0)
        np.testing.assert_allclose(image, (raw64 - dark64) / (flat64 - dark64), rtol=1e-5)
    assert got[1][0].seq_first == n_avg and got[1][0].seq_last == 2 * n_avg - 1


@pytest.mark.parametrize("n_avg", [1, 3])
def test_disabled_correction_passes_float32_mean_flagged(n_avg):
    rng = np.random.default_rng(2)
    darks, flats = reference_stacks(rng)
    raws = [rng.integers(0, 60000, SHAPE).astype(np.uint16) for _ in range(n_avg)]
    corrector = Corrector(loaded_references(darks, flats), average_frames=n_avg, enabled=False)
    out = [p for seq, raw in enumerate(raws) for p in corrector.push(make_frame("data", raw, seq))]
    (block,) = out
    acc = raws[0].astype(np.float32)
    for raw in raws[1:]:
        acc += raw
    want = acc * np.float32(1 / n_avg) if n_avg > 1 else acc
    np.testing.assert_array_equal(block.image, want)
    assert not block.corrected and block.reference_id is None
    assert block.flags == ["uncorrected: correction disabled"]
    assert corrector.counters["uncorrected"] == n_avg and corrector.counters["corrected"] == 0


def test_non_native_and_strided_frames_are_converted():
    rng = np.random.default_rng(3)
    darks, flats = reference_stacks(rng)
    raw = rng.integers(100, 250, SHAPE).astype(np.uint16)
    corrector = Corrector(loaded_references(darks, flats))
    (want,) = corrector.push(make_frame("data", raw))
    want = want.image.copy()
    (big_endian,) = corrector.push(make_frame("data", raw.astype(">u2")))
    np.testing.assert_array_equal(big_endian.image, want)
    wide = np.zeros((SHAPE[0], 2 * SHAPE[1]), np.uint16)
    wide[:, ::2] = raw
    (strided,) = corrector.push(make_frame("data", wide[:, ::2]))
    np.testing.assert_array_equal(strided.image, want)


def test_guard_gives_nan_never_inf():
    darks = np.full((1, 2, 3), 100, np.uint16)
    # flat - dark: 0, -10, 0 / 0.5 (below min_denominator), 1000, 1900 counts
    flats = np.array([[[100, 90, 100], [100.5, 1100, 2000]]], np.float32)
    raw = np.full((2, 3), 600, np.uint16)
    result = normalize(raw, darks, flats, min_denominator=1.0)
    assert np.isnan(result[0]).all() and np.isnan(result[1, 0])
    np.testing.assert_allclose(result[1, 1:], [0.5, 500 / 1900], rtol=1e-6)
    # min_denominator = 0 still never divides by zero
    zero = normalize(raw, darks, flats, min_denominator=0.0)
    assert not np.isinf(zero).any()
    assert np.isnan(zero[0]).all() and zero[1, 0] == pytest.approx(1000.0)
    refs = loaded_references(darks, flats, min_denominator=1.0, energy_ev=8000.0)
    (block,) = Corrector(refs).push(make_frame("data", raw))
    np.testing.assert_array_equal(block.image, result)


def test_normalize_reproduces_tomopy_vectors():
    folder = DATA / "tomopy-normalize"
    if not folder.is_dir():
        pytest.skip(f"tomopy test vectors not found at {folder}")
    tomo, dark, flat = (np.load(folder / f"{n}.npy") for n in ("tomo", "dark", "flat"))
    expected = np.load(folder / "normalize.npy")
    inputs = [a.copy() for a in (tomo, dark, flat)]
    result = normalize(tomo, dark, flat)
    assert result.dtype == np.float32 and result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    for before, after in zip(inputs, (tomo, dark, flat), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(("args", "match"), [
    ((np.zeros((4, 5, 6, 7)), np.zeros((4, 5)), np.ones((4, 5))), "raw must be 2-D"),
    ((np.zeros((4, 5)), np.zeros((4, 6)), np.ones((4, 5))), r"darks frames have shape \(4, 6\)"),
    ((np.zeros((4, 5)), np.zeros((0, 4, 5)), np.ones((4, 5))), "darks is empty"),
    ((np.zeros((4, 5), bool), np.zeros((4, 5)), np.ones((4, 5))), "raw must hold integer"),
    (([[1, 2]], np.zeros((1, 2)), np.ones((1, 2))), "raw must be a numpy array"),
])
def test_normalize_rejects_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        normalize(*args)
    with pytest.raises(ValueError, match="min_denominator"):
        normalize(np.zeros((2, 2)), np.zeros((2, 2)), np.ones((2, 2)), min_denominator=-1)


def test_references_are_keyed_by_energy_exposure_and_shape():
    rng = np.random.default_rng(4)
    darks, flats = reference_stacks(rng)
    refs = loaded_references(darks, flats, energy_ev=8000.0, exposure_s=0.1)
    corrector = Corrector(refs)
    raw = rng.integers(100, 250, SHAPE).astype(np.uint16)
    (same,) = corrector.push(make_frame("data", raw, energy_ev=8000.04))  # rounds to 8000.0 eV
    assert same.corrected
    cases = [
        ({"energy_ev": 8100.0}, raw,
         "no dark and no flat for energy 8100.0 eV, exposure 0.1 s, shape (8, 6)"),
        ({"exposure_s": 0.2}, raw,
         "no dark and no flat for energy 8000.0 eV, exposure 0.2 s, shape (8, 6)"),
        ({}, raw[:4],
         "no dark and no flat for energy 8000.0 eV, exposure 0.1 s, shape (4, 6)"),
    ]
    for seq, (key, image, reason) in enumerate(cases, start=1):
        (block,) = corrector.push(make_frame("data", image, seq=seq, **key))
        assert not block.corrected and block.reference_id is None
        assert block.flags == [f"uncorrected: {reason}"]
        np.testing.assert_array_equal(block.image, image.astype(np.float32))
    assert corrector.counters == {"frames": 4, "corrected": 1, "uncorrected": 3, "blocks": 4,
                                  "partial_blocks": 0}
    refs.add(make_frame("dark", darks[0], energy_ev=9000.0))
    assert refs.lookup(make_frame("data", raw, energy_ev=9000.0)) == (
        None, "no flat for energy 9000.0 eV, exposure 0.1 s, shape (8, 6)")


def test_references_runs_replace_old_frames_and_bump_id():
    shape = (2, 2)
    refs = References(n_frames=2, min_denominator=1.0)
    data = make_frame("data", np.zeros(shape, np.uint16))
    for value in (5, 10, 20):  # within one run: the ring keeps the last two
        refs.add(make_frame("dark", np.full(shape, value, np.uint16)))
    for value in (1000, 2000):
        refs.add(make_frame("flat", np.full(shape, value, np.uint16)))
    first, _ = refs.lookup(data)
    assert (first.dark == 15).all() and (first.flat == 1500).all()
    assert (first.n_dark, first.n_flat) == (2, 2)
    assert refs.lookup(data)[0] is first  # no update, no rebuild
    refs.add(make_frame("flat", np.full(shape, 4000, np.uint16)))
    second, _ = refs.lookup(data)  # a new run after data replaces the old flats at once
    assert second.id > first.id and (second.flat == 4000).all() and second.n_flat == 1
    assert (second.dark == 15).all()  # darks were not re-taken: kept
    refs.add(make_frame("flat", np.full(shape, 6000, np.uint16)))
    refs.add(make_frame("flat", np.full(shape, 8000, np.uint16)))
    refs.add(make_frame("dark", np.full(shape, 30, np.uint16)))
    third, _ = refs.lookup(data)
    assert third.id > second.id
    assert (third.flat == 7000).all() and (third.dark == 30).all()
    np.testing.assert_array_equal(third.gain, np.float32(1) / np.float32(6970))
    assert refs.counters["updates"] == 3
    assert refs.by_id(first.id) is first and refs.by_id(third.id) is third
    with pytest.raises(ValueError, match="read-only"):
        third.gain[0, 0] = 1


def test_reference_change_closes_block_early():
    rng = np.random.default_rng(5)
    darks, flats = reference_stacks(rng, n=2)
    refs = loaded_references(darks, flats)
    corrector = Corrector(refs, average_frames=3)
    raws = [rng.integers(100, 250, SHAPE).astype(np.uint16) for _ in range(5)]
    assert corrector.push(make_frame("data", raws[0], seq=0)) == []
    assert corrector.push(make_frame("data", raws[1], seq=1)) == []
    old_id = refs.lookup(make_frame("data", raws[0]))[0].id
    new_flats = rng.integers(3000, 4000, (2, *SHAPE)).astype(np.uint16)
    for flat in new_flats:  # re-taken mid-stream: the ring (n_frames=2) is fully replaced
        refs.add(make_frame("flat", flat))
    (partial,) = corrector.push(make_frame("data", raws[2], seq=2))
    assert partial.flags == ["partial_block"] and partial.n_frames == 2
    assert (partial.seq_first, partial.seq_last, partial.reference_id) == (0, 1, old_id)
    np.testing.assert_allclose(partial.image, oracle_blocks(raws[:2], darks, flats, 2)[0],
                               rtol=1e-6)
    assert refs.by_id(old_id).id == old_id
    assert corrector.push(make_frame("data", raws[3], seq=3)) == []
    (full,) = corrector.push(make_frame("data", raws[4], seq=4))
    assert full.flags == [] and full.reference_id > old_id and full.n_frames == 3
    np.testing.assert_allclose(full.image, oracle_blocks(raws[2:], darks, new_flats, 3)[0],
                               rtol=1e-6)
    assert corrector.counters["partial_blocks"] == 1 and corrector.counters["blocks"] == 2


def test_correction_state_change_and_flush_emit_partial_blocks():
    rng = np.random.default_rng(6)
    darks, flats = reference_stacks(rng)
    corrector = Corrector(loaded_references(darks, flats), average_frames=4)
    raws = [rng.integers(100, 250, SHAPE).astype(np.uint16) for _ in range(5)]
    for seq in range(3):
        assert corrector.push(make_frame("data", raws[seq], seq=seq)) == []
    elsewhere = make_frame("data", raws[3], seq=3, energy_ev=9000.0)  # no references there
    (corrected,) = corrector.push(elsewhere)
    assert corrected.corrected and corrected.n_frames == 3 and corrected.flags == ["partial_block"]
    np.testing.assert_allclose(corrected.image, oracle_blocks(raws[:3], darks, flats, 3)[0],
                               rtol=1e-6)
    after = make_frame("data", raws[4], seq=4)
    (uncorrected,) = corrector.push(after)
    assert uncorrected.n_frames == 1 and uncorrected.seq_first == uncorrected.seq_last == 3
    assert uncorrected.flags == [
        "uncorrected: no dark and no flat for energy 9000.0 eV, exposure 0.1 s, shape (8, 6)",
        "partial_block"]
    assert "average" in elsewhere.stamps and "correct" in after.stamps
    assert "average" not in after.stamps
    (last,) = corrector.flush()
    assert last.frame is after and last.flags == ["partial_block"] and "average" in after.stamps
    assert corrector.flush() == []


def test_emitted_image_survives_the_push_that_returns_it():
    rng = np.random.default_rng(7)
    darks, flats = reference_stacks(rng)
    corrector = Corrector(loaded_references(darks, flats), average_frames=2)
    raws = [rng.integers(100, 250, SHAPE).astype(np.uint16) for _ in range(2)]
    corrector.push(make_frame("data", raws[0], seq=0))
    (partial,) = corrector.push(make_frame("data", raws[1], seq=1, exposure_s=0.5))
    np.testing.assert_allclose(partial.image, oracle_blocks(raws[:1], darks, flats, 1)[0],
                               rtol=1e-6)


def test_least_recently_used_key_is_evicted():
    rng = np.random.default_rng(8)
    darks, flats = reference_stacks(rng, n=1)
    refs = References(n_frames=1, min_denominator=1.0, max_keys=2)
    for energy_ev in (7000.0, 8000.0, 9000.0):
        refs.add(make_frame("dark", darks[0], energy_ev=energy_ev))
        refs.add(make_frame("flat", flats[0], energy_ev=energy_ev))
    assert [key[0] for key in refs.keys] == [8000.0, 9000.0]
    assert refs.counters["evicted_keys"] == 1
    pair, reason = refs.lookup(make_frame("data", darks[0], energy_ev=7000.0))
    assert pair is None and reason.startswith("no dark and no flat for energy 7000.0 eV")


def test_bad_frames_and_settings_raise_clear_errors():
    refs = References(n_frames=2, min_denominator=1.0)
    corrector = Corrector(refs)
    image = np.zeros(SHAPE, np.uint16)
    with pytest.raises(ValueError, match="takes data frames, got kind 'flat'"):
        corrector.push(make_frame("flat", image))
    with pytest.raises(ValueError, match="expected a 2-D image"):
        corrector.push(make_frame("data", np.zeros((2, *SHAPE), np.uint16)))
    with pytest.raises(ValueError, match="pixel dtype complex64 is not supported"):
        corrector.push(make_frame("data", image.astype(np.complex64)))
    with pytest.raises(ValueError, match="takes dark or flat frames, got kind 'data'"):
        refs.add(make_frame("data", image))
    with pytest.raises(ValueError, match="non-empty 2-D image"):
        refs.add(make_frame("dark", np.zeros((0, 0), np.uint16)))
    assert corrector.counters["frames"] == 0 and refs.counters["darks"] == 0
    with pytest.raises(ValueError, match="n_frames must be an integer >= 1"):
        References(n_frames=0, min_denominator=1.0)
    with pytest.raises(ValueError, match="min_denominator must be finite"):
        References(n_frames=1, min_denominator=float("nan"))
    with pytest.raises(ValueError, match="average_frames must be an integer >= 1"):
        Corrector(refs, average_frames=0)


PIXEL_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int32, np.float32])


@st.composite
def correction_inputs(draw):
    dtype = draw(PIXEL_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6))
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(-50, 300, width=32, allow_nan=False, allow_infinity=False)
    else:
        elements = st.integers(0, 250)

    def stack(n_max):
        n = draw(st.integers(1, n_max))
        return draw(hnp.arrays(dtype, (n, *shape), elements=elements))

    return stack(3), stack(3), stack(3), draw(st.sampled_from([0.0, 1.0, 7.5]))


@settings(max_examples=60, deadline=None)
@given(correction_inputs())
def test_corrector_single_frames_equal_normalize(inputs):
    raws, darks, flats, min_denominator = inputs
    expected = normalize(raws, darks, flats, min_denominator=min_denominator)
    refs = loaded_references(darks, flats, n_frames=3, min_denominator=min_denominator)
    corrector = Corrector(refs, average_frames=1)
    for seq, raw in enumerate(raws):
        (block,) = corrector.push(make_frame("data", raw, seq=seq))
        assert block.corrected
        np.testing.assert_array_equal(block.image, expected[seq])  # NaN where guarded
