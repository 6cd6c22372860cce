"""What a run reports, read back from its output: the run report and its totals, the contact
sheet, the caption evaluation and the judge, the sweep report. Reads the sink through
stages/tables.py; never imports the pipeline."""
