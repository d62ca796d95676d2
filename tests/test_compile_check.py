"""The PTX reading of ``fastdpo.kernels.compile_check`` (CI runs the check itself on every kernel)."""

import pytest

from fastdpo.kernels.compile_check import access_widths, narrow

# Lines as Triton 3.9 writes them for sm_90 (forward: pipelined 16-byte copies, scalar fp32 outputs; backward of
# V 1000: 4-byte copies of fp32 logits, 2-byte bf16 gradient stores)
WIDE = """
	cp.async.cg.shared.global [ %r37 + 0 ], [ %rd47 + 0 ], 0x10, %r38;
	cp.async.commit_group;
	cp.async.wait_group 	1;
	st.global.v4.b32 [ %rd60 + 0 ], { %r90, %r91, %r92, %r93 };
	@%p9 st.global.b32 [ %rd61 + 0 ], { %r94 };
"""
NARROW = """
	cp.async.ca.shared.global [ %r12 + 0 ], [ %rd20 + 0 ], 0x4, %r13;
	cp.async.ca.shared.global [ %r14 + 0 ], [ %rd21 + 0 ], 4;
	@%p3 st.global.b16 [ %rd30 + 0 ], { %rs5 };
	st.global.v2.b32 [ %rd31 + 0 ], { %r1, %r2 };
"""


def test_access_widths_reads_copies_and_stores():
    assert access_widths(WIDE) == ([16], [4, 16])
    assert access_widths(NARROW) == ([4], [2, 8])
    assert access_widths("ld.global.b64 %rd1, [ %rd2 + 0 ];") == ([], [])


def row(kernel, copies, stores, aligned=True):
    return {"kernel": kernel, "aligned16": aligned, "error": None, "copy_bytes": copies, "store_bytes": stores}


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (row("_logps_fwd_kernel[whole_row]", [16], [4]), False),  # scalar outputs are not row traffic
        (row("_logps_fwd_kernel[whole_row]", [4, 16], [4]), True),
        (row("_logps_fwd_kernel[whole_row]", [], [4]), True),  # not pipelined at all
        (row("_logps_fwd_kernel[whole_row]", [2], [4], aligned=False), False),  # V % 16 != 0 cannot vectorise
        (row("_logps_fwd_kernel[fold_partials]", [], [4]), False),  # reads no logits
        (row("_logps_bwd_kernel", [16], [16]), False),
        (row("_logps_bwd_kernel", [16], [2]), True),
    ],
)
def test_narrow_flags_aligned_launches_without_16_byte_row_access(r, expected):
    assert narrow(r) is expected


@pytest.mark.parametrize(
    ("cc", "registers", "num_warps", "shared", "expected"),
    [
        (90, 32, 8, 8224, 8),  # the bf16 forward: warps are the limit (64 / 8)
        (90, 33, 8, 8224, 6),  # registers come in steps of 8: 40 a thread leave 51 warps, 6 programs
        (90, 54, 8, 8224, 4),  # the forward with every statistic
        (90, 40, 8, 32768, 6),  # the fp32 backward: registers and shared memory (233472 // 33792 = 6) agree
        (80, 28, 8, 32768, 4),  # 164 KB of shared memory on A100: 167936 // 33792 = 4
        (100, 40, 8, 32768, 6),  # B200: H100's limits (228 KB of shared memory, 64K registers, 64 warps)
        (90, 16, 1, 0, 32),  # one-warp programs: at most 32 resident
    ],
)
def test_programs_per_sm(cc, registers, num_warps, shared, expected):
    from fastdpo.kernels.compile_check import programs_per_sm

    assert programs_per_sm(cc, registers, num_warps, shared) == expected
