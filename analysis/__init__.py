"""Analysis of a sweep: result.json files -> statistics, tables, figures, report.

`collect` reads the runs into one tidy DataFrame (checked against
`common.schema`), `stats` aggregates over seeds (Student-t intervals, paired
ViT - CNN differences, test-sampling intervals at one seed, identified
power-law fits and the crossover inside the measured sizes), `tables` and
`plots` render them with what `outputs` shares (the order of models and
conditions, labels, writing), and `report` ties it all into
`results/SWEEP/report.md`. `cli` is the one entry point:
`python -m analysis collect|tables|plots|report --sweep NAME`. Only pandas,
numpy, scipy, matplotlib and seaborn are used: this package never imports
torch, `experiments` or `lightning_modules`.
"""
