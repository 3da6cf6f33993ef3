"""Benchmarks: measured numbers behind the choices the project reports (speed, data realism)."""
