"""`shardrt serve`: an OpenAI-compatible HTTP server over one `Cluster`.

schema (request bodies in, response and chunk shapes out), engine (the queue and the one
thread that owns the Cluster, its restarts and cancellation), metrics (Prometheus text),
http (routing, SSE, client disconnects), serve (binding, start-up and shutdown).
"""
