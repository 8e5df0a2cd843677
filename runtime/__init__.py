"""What the process needs before and around any model: the compute dtype this machine is good
at (``hardware``), the host allocator (``host_memory``) and the compilation caches
(``compilation_cache``). Imports nothing of the project: training, decoding and the
benchmarks build on it."""
