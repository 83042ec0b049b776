"""The build layer: executing the chapters (orchestrate, with the run key and chapter
dependencies), rendering the book and the course editions, and the benchmarks."""
