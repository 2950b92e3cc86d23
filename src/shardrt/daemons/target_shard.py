"""Target-shard daemon: `python -m shardrt.daemons.target_shard SPEC_JSON`, exec'd by the coordinator."""

import sys

from shardrt.worker import main

if __name__ == "__main__":
    sys.exit(main())
