"""Speed and memory benchmarks; they import core, nothing imports them."""
