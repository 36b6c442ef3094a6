"""Generative Teaching Networks (Such et al., ICML 2020): a generator teacher with a learned
curriculum, trained through ``distill``'s one meta-training loop by each method of one table
(:data:`GTN_METHODS`: unrolled backprop, stored or recomputed, the implicit function theorem,
the first-order trajectory gradient with an exact tail, gradient matching, trajectory
matching); and their
comparison by peak memory and student accuracy; and the architecture-search proxy
(:mod:`gtn.nas`) that ranks candidate students by short training on generated, condensed or
selected data.
"""

from .generator import CURRICULA, Generator, GeneratorConfig, GeneratorError, GeneratorTeacher
from .methods import GTNMethod
from .sets import generator_set, load_generator_set
from .train import (
                    GTN_METHODS,
                    RECIPES,
                    GTNConfig,
                    few_step_accuracy,
                    fixed_set_accuracy,
                    load_generator,
                    recipe_config,
                    save_generator,
                    split_validation,
                    train_gtn,
)

__all__ = ["CURRICULA", "Generator", "GeneratorConfig", "GeneratorError", "GeneratorTeacher",
           "GTN_METHODS", "GTNMethod", "RECIPES", "GTNConfig", "few_step_accuracy",
           "fixed_set_accuracy", "generator_set", "load_generator", "load_generator_set",
           "recipe_config", "save_generator",
           "split_validation", "train_gtn"]
