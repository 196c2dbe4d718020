"""Shared-memory blocks: naming, permissions, cleanup, and sweeping blocks of dead owners."""
import os
import stat
import subprocess
import sys

import numpy as np

from engine.parallel.shm import SHM_DIRECTORY, SharedBlock, blocks_of, sweep_orphaned_blocks


def test_block_is_named_after_its_owner_and_private_to_it():
    block = SharedBlock.create("test", 1024)
    try:
        assert block.name.startswith(f"engine_{os.getpid()}_")
        mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIRECTORY, block.name)).st_mode)
        assert mode == 0o600
    finally:
        block.close()


def test_close_unlinks_and_is_safe_to_call_twice():
    block = SharedBlock.create("test", 64)
    name = block.name
    block.close()
    block.close()
    assert name not in blocks_of(os.getpid())


def test_attached_view_sees_the_owners_writes():
    owner = SharedBlock.create("test", 80)
    reader = SharedBlock.attach(owner.name, 80)
    try:
        owner.array((10,), np.float64)[:] = np.arange(10)
        np.testing.assert_array_equal(reader.array((10,), np.float64), np.arange(10))
    finally:
        reader.close()
        owner.close()
    assert owner.name not in blocks_of()


def test_sweep_removes_blocks_of_a_dead_owner_and_keeps_live_ones():
    code = ("import sys; sys.path.insert(0, %r); from engine.parallel.shm import SharedBlock; "
            "b = SharedBlock.create('orphan', 64); print(b.name); import os; os._exit(0)"
            % os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    orphan = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    mine = SharedBlock.create("alive", 64)
    try:
        assert orphan in blocks_of()
        removed = sweep_orphaned_blocks()
        assert orphan in removed and orphan not in blocks_of()
        assert mine.name in blocks_of()
    finally:
        mine.close()
