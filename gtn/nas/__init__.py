"""Architecture search with a cheap proxy: does a short training keep the true ranking?

Such, Rawal, Lehman, Stanley & Clune, "Generative Teaching Networks: Accelerating Neural
Architecture Search by Learning to Generate Synthetic Training Data", ICML 2020, train every
candidate architecture for a few steps on GTN-generated data and keep the order that full
training on real data would give (published: Spearman 0.56 with the true accuracy on the top
half of the architectures, at about 9x fewer steps). This package measures that for any
proxy, one concept per module:

* a **search space** over the student zoo (:func:`sample_candidates`): ConvNets of depth 1-4,
  width 16-256, every norm / activation / pooling of :mod:`distill.models`, plus MLP, LeNet,
  AlexNet, VGG-11 and ResNet-18 variants, each with a stable id (a hash of its canonical spec),
  parameter count and multiply-accumulates per image, filtered by family and cost;
* the **ground truth**: each candidate trained on real training images under a stated budget
  and scored on a validation split held out of the *training* set (:func:`split_validation`,
  never the test set); one JSON file per (data set, candidate, budget fingerprint, seed) in a
  cache, written atomically as each candidate finishes, so a rerun skips what is done;
* **proxies**, each a short training of the candidate scored on the same validation split
  (:data:`PROXY_KINDS`): ``gtn:RUN`` (the generator's learned curriculum as a fixed set),
  ``dc:RUN`` (a condensed set), ``coreset:METHOD`` (a coreset of a selection rule),
  ``real-subset`` (random real images, IPC per class) and ``real-steps`` (fresh real images
  for the same number of SGD steps);
* **ranking quality** (:func:`rank_quality`): Spearman and Kendall tau-b with percentile
  bootstrap intervals over all candidates and over the top half by true accuracy, top-k
  overlap, the true accuracy of the architecture the proxy picks, and the speed-up;
* **several draws** of candidates (``run_search(draws=K)``): the same figures per draw, their
  mean with a t interval across draws, how often each proxy ranks first, and a **paired
  comparison** of the proxies on the same candidates (:func:`compare_proxies`: stratified
  paired bootstrap of the Spearman difference, Holm-adjusted), which names a winner only
  when it beats every other proxy significantly.

Every student trains through :func:`distill.engine.train`. A candidate's initialisation and
batch order come from ``child_seed(seed, "nas", candidate id)`` and never from the order of
evaluation, so every (set, candidate) student is a work item of :mod:`distill.executor`, and
``workers=K`` (spawned processes) or Ray tasks (``executor=ExecutorConfig(kind="ray")``) give
the numbers of ``workers=1`` (with the same threads per item).
"""

from .budgets import NAS_BUDGETS, NASBudget
from .candidates import evaluate_candidates, train_candidate
from .compare import bootstrap_draws, compare_proxies, holm, mean_interval, spearman_rows
from .errors import NASError
from .proxies import (
                      PROXY_KINDS,
                      ProxySpec,
                      TrainSet,
                      build_proxy_set,
                      nas_split,
                      parse_proxies,
                      parse_proxy,
                      resolve_proxy,
                      truth_set,
)
from .ranking import bootstrap_ci, kendall, rank_quality, spearman
from .report import draws_markdown, plot_scatter, report_markdown
from .search import run_search, summarize_draws
from .space import FAMILIES, Candidate, SearchSpace, canonical_spec, model_cost, sample_candidates

__all__ = [
    "FAMILIES",
    "NAS_BUDGETS",
    "PROXY_KINDS",
    "Candidate",
    "NASBudget",
    "NASError",
    "ProxySpec",
    "SearchSpace",
    "TrainSet",
    "bootstrap_ci",
    "bootstrap_draws",
    "build_proxy_set",
    "canonical_spec",
    "compare_proxies",
    "draws_markdown",
    "evaluate_candidates",
    "holm",
    "kendall",
    "mean_interval",
    "model_cost",
    "nas_split",
    "parse_proxies",
    "parse_proxy",
    "plot_scatter",
    "rank_quality",
    "report_markdown",
    "resolve_proxy",
    "run_search",
    "sample_candidates",
    "spearman",
    "spearman_rows",
    "summarize_draws",
    "train_candidate",
    "truth_set",
]
