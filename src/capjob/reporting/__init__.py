"""Human-facing views of a run's output (the contact sheet)."""
