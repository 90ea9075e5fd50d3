"""Per-rank bodies of the misuse tests: each returns the error text this rank got (None: no error),
so the test can check that every rank raised the same clear error, within seconds, and no rank hung."""
import torch
import torch.distributed as dist

import ffc_parallel as fp
from tests.cases_engine import DIM, IN_DIM, Net, ds_config, global_batch, micro_slice

NUM_CLASSES, MICRO = 9, 2


def _one_step(engine):
    rank, world = fp.get_rank(), fp.get_world_size()
    x, y = global_batch(0, MICRO * world, NUM_CLASSES)
    loss = engine(micro_slice(x, 0, rank, world, MICRO), micro_slice(y, 0, rank, world, MICRO))
    engine.backward(loss)
    engine.step()


def _error_of(fn):
    try:
        fn()
    except (ValueError, RuntimeError, TypeError, FileNotFoundError, KeyError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def head_weight_given_to_deepspeed(route, stage):
    import deepspeed

    net = Net(NUM_CLASSES)
    params = list(net.parameters()) + [net.classifier.weight]
    config = ds_config(stage, "sgd", 1, MICRO, fp.get_world_size())
    initialize = deepspeed.initialize if route == "drop_in" else fp.initialize
    return _error_of(lambda: _one_step(initialize(model=net, model_parameters=params, config=config)[0]))


def head_weight_in_a_client_optimizer():
    import deepspeed

    net = Net(NUM_CLASSES)
    opt = torch.optim.SGD(list(net.parameters()) + [net.classifier.weight], lr=0.1)
    config = ds_config(0, "sgd", 1, MICRO, fp.get_world_size())
    del config["optimizer"]
    return _error_of(lambda: _one_step(deepspeed.initialize(model=net, optimizer=opt, config=config)[0]))


def head_on_another_group():
    import deepspeed

    world = fp.get_world_size()
    # every rank creates both groups (a collective); the head of the first W-1 ranks, and the last rank's own
    groups = [dist.new_group(list(range(world - 1))), dist.new_group([world - 1])]
    net = Net(NUM_CLASSES)
    mine = groups[0] if fp.get_rank() < world - 1 else groups[1]
    net.classifier = fp.ShardedClassifier(DIM, NUM_CLASSES, margin="cosface", scale=16.0, group=mine)
    config = ds_config(1, "sgd", 1, MICRO, world)
    return _error_of(lambda: _one_step(deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                                            config=config)[0]))


def head_in_two_engines():
    import deepspeed

    net = Net(NUM_CLASSES)
    config = ds_config(1, "sgd", 1, MICRO, fp.get_world_size())
    first, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    _one_step(first)
    wrapper = torch.nn.ModuleDict({"net": net})
    wrapper.forward = lambda x, y: net(x, y)
    second, *_ = deepspeed.initialize(model=wrapper, model_parameters=wrapper.parameters(), config=config)
    return _error_of(lambda: _one_step(second))


def head_outside_the_engines_model():
    import deepspeed

    net = Net(NUM_CLASSES)
    head = net.classifier
    features = net.features
    config = ds_config(1, "sgd", 1, MICRO, fp.get_world_size())
    engine, *_ = deepspeed.initialize(model=features, model_parameters=features.parameters(), config=config)
    rank, world = fp.get_rank(), fp.get_world_size()
    x, y = global_batch(0, MICRO * world, NUM_CLASSES)

    def step():
        loss = head(engine(micro_slice(x, 0, rank, world, MICRO)), micro_slice(y, 0, rank, world, MICRO))
        engine.backward(loss)
        engine.step()
    return _error_of(step)


def unsupported_optimizer():
    import deepspeed

    net = Net(NUM_CLASSES)
    config = ds_config(0, "sgd", 1, MICRO, fp.get_world_size())
    del config["optimizer"]
    opt = torch.optim.RMSprop(net.parameters(), lr=0.01)
    return _error_of(lambda: _one_step(deepspeed.initialize(model=net, optimizer=opt, config=config)[0]))


def plain_deepspeed_checkpoint_without_shards(ckpt):
    """``engine.save_checkpoint`` then ``engine.load_checkpoint`` (DeepSpeed's own): the next forward
    refuses (the rows were not restored); ``fp.load_checkpoint`` of that checkpoint refuses too."""
    import deepspeed

    config = ds_config(1, "sgd", 1, MICRO, fp.get_world_size())
    net = Net(NUM_CLASSES)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    _one_step(engine)
    engine.save_checkpoint(ckpt)
    other = Net(NUM_CLASSES)
    engine2, *_ = deepspeed.initialize(model=other, model_parameters=other.parameters(), config=config)
    engine2.load_checkpoint(ckpt)
    forward = _error_of(lambda: _one_step(engine2))
    ours = _error_of(lambda: fp.load_checkpoint(engine2, ckpt))
    return {"forward": forward, "fp_load": ours}


def shards_of_another_class_count(ckpt):
    import deepspeed

    config = ds_config(1, "sgd", 1, MICRO, fp.get_world_size())
    net = Net(NUM_CLASSES)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    _one_step(engine)
    fp.save_checkpoint(engine, ckpt)
    other = Net(NUM_CLASSES + 3)
    engine2, *_ = deepspeed.initialize(model=other, model_parameters=other.parameters(), config=config)
    return _error_of(lambda: fp.load_checkpoint(engine2, ckpt))


def state_dict_never_holds_rows():
    """``module.state_dict()`` holds a marker, not a part of the classifier; loading it into a model
    leaves the head refusing to run until its rows are restored."""
    net = Net(NUM_CLASSES)
    state = net.state_dict()
    keys = sorted(k for k in state if k.startswith("classifier."))
    other = Net(NUM_CLASSES)
    other.load_state_dict(state)
    error = _error_of(lambda: other.classifier(torch.randn(2, DIM), torch.tensor([0, 1])))
    mismatch = _error_of(lambda: Net(NUM_CLASSES + 1).load_state_dict(state))
    return {"keys": keys, "error": error, "mismatch": mismatch,
            "weight_in_parameters": any(p is net.classifier.weight for p in net.parameters())}


def refused_batch_leaves_the_model(route):
    """A NaN image on the last rank: every rank's error, and whether every parameter and buffer (the
    backbone's BatchNorm statistics included) is as before; then a good step must still run."""
    import deepspeed

    class WithNorm(Net):
        def __init__(self):
            super().__init__(NUM_CLASSES)
            self.features = torch.nn.Sequential(torch.nn.Linear(IN_DIM, 12), torch.nn.BatchNorm1d(12), torch.nn.Tanh(),
                                                torch.nn.Linear(12, DIM))

    net = WithNorm()
    config = ds_config(1, "sgd", 1, MICRO, fp.get_world_size())
    if route == "drop_in":
        engine = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)[0]
    else:
        model = fp.HybridModel(net.features, net.classifier)
        engine = fp.initialize(model=model, config=config)[0]
    _one_step(engine)                      # a first good step: the head is attached, the statistics moved
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    weight = engine.module.classifier.weight.detach().clone() if route == "drop_in" else \
        engine.module.head.weight.detach().clone()
    rank, world = fp.get_rank(), fp.get_world_size()
    x, y = global_batch(1, MICRO * world, NUM_CLASSES)
    x = micro_slice(x, 0, rank, world, MICRO).clone()
    if rank == world - 1:
        x[0, 0] = float("nan")
    message = _error_of(lambda: engine(x, micro_slice(y, 0, rank, world, MICRO)))
    after = engine.module.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before if not k.endswith("_extra_state"))
    head = engine.module.classifier if route == "drop_in" else engine.module.head
    unchanged = unchanged and torch.equal(weight, head.weight.detach())
    _one_step(engine)
    return {"message": message, "unchanged": unchanged}
