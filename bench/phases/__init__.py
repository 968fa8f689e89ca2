"""The bench's phases, one module each: perf, spread, accuracy, memory, global_ (the rate-limit
service), ab (the A/B quick mode). Each returns raw rows; bench/report.py turns them into tables."""
