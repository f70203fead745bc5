"""Benchmarks: oni's Shapley backends against shap, captum and shapiq (see BENCHMARKS.md)."""
