"""Benchmarks behind `mint bench NAME` (installed as mintmesh.bench).

Each benchmark is a module mintmesh.bench.<name> (dashes -> underscores) with
`main(argv: list[str] | None = None) -> int` that writes progress to stderr and prints one JSON
object {"bench": NAME, "device": ..., "params": {...}, "metrics": {...}} as the last line of
stdout.
"""
