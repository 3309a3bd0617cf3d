"""The servers the turn-latency benchmark compares durachat's api with; see `benchmarks.peer_arms`, which starts them."""
