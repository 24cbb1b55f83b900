def check_labels(model, example, y, *, where="train_data"):
    pass


def split_inputs(model, x):
    if isinstance(x, dict):
        x = dict(x)
        return x.pop("x"), x
    return x, {}
