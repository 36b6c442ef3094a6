"""Generative Teaching Networks (Such et al., ICML 2020) and the architecture-search proxy.

Not built yet: this package is reserved for the GTN issue (generator teachers, curricula, the
unrolled / implicit / gradient-matching comparison) and the NAS-proxy issue.
"""
