"""The stages of a run: training, the figures, the evaluation, and the comparison of runs, chained by the pipeline."""
