"""Analysis of a sweep: result.json files -> statistics, tables, figures, report.

`collect` reads the runs into one tidy DataFrame, `stats` aggregates over
seeds (bootstrap CIs, paired ViT - CNN differences, power-law fits and the
crossover size), `tables` and `plots` render them, and `report` ties it all
into `results/SWEEP/report.md`. Only pandas, numpy, scipy, matplotlib and
seaborn are used: this package never imports torch.
"""
