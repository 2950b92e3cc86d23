"""Stage daemons on other hosts, started through Ray.

Nothing here imports Ray at import time: `ray_cluster` and `host_actor` import it inside the
functions that need it, so one-box use never loads Ray. Ray ships as the optional extra
`pip install 'shardrt[cluster]'`.
"""
