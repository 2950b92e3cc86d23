"""Inter-process plumbing between the coordinator and its daemons: shared memory, wire codec,
protocol, and the ZeroMQ client of a remote stage."""
