"""Studies and ablations behind the model card: scores per coast, the recipes compared, what did not ship.

Nothing here ships in the plugin.  They read the shared data (../shared/data), import the core like any
other caller and run from the checkout's root, e.g.

    .venv/bin/python -m studies.evaluate_coasts MODEL.pt     per-zone scores next to a random forest and MVI
    studies/ablate_coasts.sh VARIANT                         one ablation: train, then evaluate_coasts

``evaluate_coasts`` rebuilds a model's own split; the other studies import it from here.
"""
