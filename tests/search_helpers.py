"""What the grid search's unit and end-to-end tests share: small configs and expected names."""

from experiments import trials


def quiet(*_):
    return None


def one_of(registry):
    """How an error message lists a registry's names (``trials.choose``): 'a, b or c'."""
    names = sorted(registry)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def network(train_config, c):
    spec, arch = trials.network(train_config, c)
    return arch, spec.resolution


def with_search(c, **search):
    c = c.copy_and_resolve_references()
    for k, v in search.items():
        c.search[k] = v
    return c
