"""tests/vm/guest runs inside the test VM only (scripts/test-vm); the host's pytest does
not collect it."""

import os

collect_ignore = [] if os.environ.get("CRIPY_VM_GUEST") else ["guest"]
