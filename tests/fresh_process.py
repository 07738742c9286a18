"""What scripts run in a fresh process (a Hub user's machine) start with."""

import textwrap

# This repository must not be importable there, only the saved folder's remote code: even an editable install of
# it must not help.
BLOCK_REPOSITORY = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockRepository(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("processing", "modeling_nanovlm"):
                raise ImportError(f"{name} must not be importable here")

    sys.meta_path.insert(0, BlockRepository())
    """
)
