"""edmlab.checkpoints: official EDM snapshots read safely, edmlab checkpoints round-trip bit for bit."""

import importlib.util
import math
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edmlab.checkpoints import (
    CheckpointFormatError,
    UnsafePickleError,
    load_any,
    load_denoiser,
    load_edm_pickle,
    read_edm_snapshot,
    save_denoiser,
)
from edmlab.networks import build
from edmlab.precond import Denoiser, iddpm_u

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- an EDM snapshot writer
# NVlabs' torch_utils.persistence reduces each persistent object to
#   _reconstruct_persistent_obj(dict(type='class', version=6, module_src=<module source>,
#                                    class_name=<name>, state=<Module.__getstate__()>))
# with `_init_args`/`_init_kwargs` inside the state, and training_loop.py pickles
#   dict(ema=<precond, eval, requires_grad off, CPU>, loss_fn, augment_pipe, dataset_kwargs).
# This writer produces that structure without NVlabs code: the reconstructor is written by name.


class _Global:
    """A global written into the pickle by name, without importing it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reducers to be callable; this one is only ever written
        raise RuntimeError(f"{self.module}.{self.name} is a name in a test pickle, not a function")


class _Payload:
    """Pickles as `module.name(*args)`, the way a malicious checkpoint smuggles a call."""

    def __init__(self, func: _Global, *args) -> None:
        self.func, self.args = func, args


RECONSTRUCT = _Global("torch_utils.persistence", "_reconstruct_persistent_obj")
# Would leave a marker if anything ever exec'd the pickled source (NVlabs' loader does exactly that).
EVIL_SOURCE = "import pathlib\npathlib.Path({marker!r}).write_text('module_src was executed')\n"


class _SnapshotPickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_named_global(self, obj: _Global) -> None:
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    dispatch[_Global] = _save_named_global

    def __init__(self, file, records: dict, module_src: str) -> None:
        super().__init__(file, protocol=4)
        self.records, self.module_src = records, module_src

    def reducer_override(self, obj):
        if isinstance(obj, _Payload):
            return obj.func, obj.args
        if id(obj) not in self.records:
            return NotImplemented
        class_name, init_kwargs = self.records[id(obj)]
        if isinstance(obj, nn.Module):
            state = obj.__getstate__()
            if class_name in ("SongUNet", "DhariwalUNet"):  # EDM's networks keep only label_dropout
                state = {k: v for k, v in state.items() if k.startswith("_") or k in ("training", "label_dropout")}
        else:
            state = dict(vars(obj))
        state.update(_init_args=(), _init_kwargs=init_kwargs)
        if class_name == "UNetBlock":  # EDM stores skip_scale=np.sqrt(0.5): numpy scalars in the state
            state["skip_scale"] = np.float64(state["skip_scale"])
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        return RECONSTRUCT, (meta,)


PRECOND_ATTRS = {  # plain attributes of NVlabs' precond modules (their defaults)
    "EDMPrecond": dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, sigma_min=0.0009765625,
                      sigma_max=152.16718),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100),
    "iDDPMPrecond": dict(C_1=0.001, C_2=0.008, M=1000, sigma_min=0.0064223, sigma_max=20291.17),
}
EDM_ARCH = {  # EDM train.py's network kwargs per --arch, at a test size
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "adm": dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4]),
}


def edm_network(arch: str, label_dim: int, augment_dim: int, out_channels: int = 3, seed: int = 0) -> nn.Module:
    """The weights of the fixture: an edmlab network with random values in every tensor."""
    kwargs = {k: v for k, v in EDM_ARCH[arch].items() if k != "model_type"}
    torch.manual_seed(seed)
    net = build(arch, img_resolution=8, img_channels=3, label_dim=label_dim, augment_dim=augment_dim,
                dropout=0.13, out_channels=out_channels, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval().requires_grad_(False)


def write_edm_snapshot(path: Path, net: nn.Module, precond: str, arch: str, precond_kwargs: dict | None = None,
                       model_kwargs: dict | None = None, extra: dict | None = None, marker: Path | None = None):
    """Write `net` as EDM's training loop would have pickled `EDMPrecond(...)` etc. holding it as `model`."""
    label_dim, augment_dim = net.label_dim, net.augment_dim
    arch_kwargs = dict(EDM_ARCH[arch], augment_dim=augment_dim, dropout=0.13, use_fp16=False)
    init_kwargs = dict(img_resolution=8, img_channels=3, label_dim=label_dim, **arch_kwargs, **(precond_kwargs or {}))
    top = nn.Module()  # stands for the precond module: its attributes, buffers and `model`
    top.img_resolution, top.img_channels, top.label_dim, top.use_fp16 = 8, 3, label_dim, False
    for key, value in {**PRECOND_ATTRS.get(precond, {}), **(precond_kwargs or {})}.items():
        setattr(top, key, value)
    if precond == "iDDPMPrecond":
        top.register_buffer("u", iddpm_u(dtype=torch.float32))
    top.model = net
    top.eval()
    model_init = dict(img_resolution=8, in_channels=3, out_channels=net.out_channels, label_dim=label_dim,
                      **{k: v for k, v in arch_kwargs.items() if k not in ("model_type", "use_fp16")})
    records = {id(top): (precond, init_kwargs), id(net): (type(net).__name__, model_kwargs or model_init)}
    for module in net.modules():
        if module is not net and not isinstance(module, nn.ModuleDict):
            kwargs = {}
            if type(module).__name__ == "UNetBlock":
                kwargs = dict(in_channels=module.in_channels, out_channels=module.out_channels,
                              emb_channels=module.emb_channels, skip_scale=np.sqrt(0.5))
            records[id(module)] = (type(module).__name__, kwargs)
    loss_fn = types.SimpleNamespace(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    augment_pipe = types.SimpleNamespace(p=0.12, xflip=1e8, yflip=1.0, scale=1.0, rotate_frac=1.0)
    records[id(loss_fn)] = ("EDMLoss", {})
    records[id(augment_pipe)] = ("AugmentPipe", dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1))
    data = dict(ema=top, loss_fn=loss_fn, augment_pipe=augment_pipe,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip",
                                    use_labels=label_dim > 0, xflip=False, cache=True, resolution=8,
                                    max_size=50000))
    data.update(extra or {})
    source = EVIL_SOURCE.format(marker=str(marker)) if marker else "class SongUNet: ...\n"
    with open(path, "wb") as f:
        _SnapshotPickler(f, records, source).dump(data)
    return path


class _Inert:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _GlobalRecorder(pickle.Unpickler):
    """Lists the globals a pickle names; every one resolves to an inert class, so nothing runs."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.names: set[str] = set()

    def find_class(self, module, name):
        self.names.add(f"{module}.{name}")
        return _Inert


def pickle_globals(path: Path) -> set[str]:
    with open(path, "rb") as f:
        recorder = _GlobalRecorder(f)
        recorder.load()
    return recorder.names


# ---------------------------------------------------------------------------- 3. EDM snapshots load


def table1(name: str, sigma: torch.Tensor):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1, written out here independently of edmlab.precond."""
    s = sigma.reshape(-1, 1, 1, 1)
    if name == "edm":
        sd = 0.5
        return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt(), sigma.log() / 4
    if name == "vp":
        beta_d, beta_min = 19.9, 0.1
        t = ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d
        return 1, -s, 1 / (s**2 + 1).sqrt(), 999 * t
    if name == "ve":
        return 1, s, 1, (sigma / 2).log()
    if name == "iddpm":  # sigma = 0.5, 1 and 80 snap to u_710, u_504, u_8 (EDM's code: c_noise 289, 495, 991)
        return 1, -s, 1 / (s**2 + 1).sqrt(), torch.tensor([289.0, 495.0, 991.0])
    raise AssertionError(name)


CASES = [  # (EDM precond class, edmlab name, arch, label_dim, augment_dim)
    ("EDMPrecond", "edm", "ddpmpp", 10, 9),
    ("VPPrecond", "vp", "ddpmpp", 0, 0),
    ("VEPrecond", "ve", "ncsnpp", 10, 0),
    ("EDMPrecond", "edm", "adm", 10, 0),
    ("iDDPMPrecond", "iddpm", "adm", 0, 0),
]


@pytest.mark.parametrize("precond, name, arch, label_dim, augment_dim", CASES)
def test_edm_snapshot_reproduces_its_denoiser(tmp_path, precond, name, arch, label_dim, augment_dim):
    net = edm_network(arch, label_dim, augment_dim, out_channels=6 if name == "iddpm" else 3)
    marker = tmp_path / "module_src_ran"
    path = write_edm_snapshot(tmp_path / "network-snapshot-000000.pkl", net, precond, arch, marker=marker)
    assert pickle_globals(path) == {
        "torch_utils.persistence._reconstruct_persistent_obj", "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter", "torch.storage._load_from_bytes", "collections.OrderedDict",
        "torch.nn.modules.container.ModuleDict", "numpy.dtype", f"{np.float64(0).__reduce__()[0].__module__}.scalar",
    }

    snapshot = read_edm_snapshot(path)
    D = snapshot.denoiser
    assert not marker.exists() and "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    assert (D.precond.name, D.net.build_config["name"], D.label_dim, D.net.augment_dim) == (name, arch, label_dim,
                                                                                     augment_dim)
    assert snapshot.loss == {"class_name": "EDMLoss", "kwargs": {}}
    assert snapshot.dataset_kwargs["path"] == "cifar10-32x32.zip"
    loaded, source = D.net.state_dict(), net.state_dict()
    assert list(loaded) == list(source) and all(torch.equal(loaded[k], source[k]) for k in source)

    # D = c_skip x + c_out F(c_in x; c_noise), with F the fixture's own network and Table 1's coefficients.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 1.0, 80.0])
    labels = F.one_hot(torch.tensor([1, 4, 9]), label_dim).float() if label_dim else None
    augment = torch.randn(3, augment_dim, generator=g) if augment_dim else None
    c_skip, c_out, c_in, c_noise = table1(name, sigma)
    with torch.no_grad():
        expected = c_skip * x + c_out * net(c_in * x, c_noise, labels, augment)[:, :3]
        got = D(x, sigma, class_labels=labels, augment_labels=augment)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_real_edm_constants_are_kept(tmp_path):
    net = edm_network("ddpmpp", 0, 0)
    path = write_edm_snapshot(tmp_path / "s.pkl", net, "VPPrecond", "ddpmpp",
                              precond_kwargs=dict(beta_d=10.0, beta_min=0.2, M=500))
    D = load_edm_pickle(path)
    assert D.precond_params == dict(sigma_data=0.5, beta_d=10.0, beta_min=0.2, M=500, epsilon_t=1e-5)


# ---------------------------------------------------------------------------- 3b. nothing from a pickle runs


def payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "os.system": _Payload(_Global("os", "system"), f"touch {marker}"),
        "builtins.eval": _Payload(_Global("builtins", "eval"), f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(_Global("subprocess", "Popen"), ["touch", str(marker)]),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["top", "inside_snapshot"])
def test_malicious_globals_are_refused_before_anything_runs(tmp_path, monkeypatch, name, where):
    marker = tmp_path / "pwned"
    payload = payloads(marker)[name]
    path = tmp_path / "evil.pkl"
    if where == "top":
        with open(path, "wb") as f:
            _SnapshotPickler(f, {}, "").dump(payload)
    else:  # a well-formed snapshot whose dataset_kwargs carry the call
        write_edm_snapshot(path, edm_network("ddpmpp", 0, 0), "EDMPrecond", "ddpmpp",
                           extra=dict(dataset_kwargs=dict(path=payload)))

    # The payload is live: a plain pickle.load runs it (proving the test would see a side effect) ...
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = lambda meta: meta
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    obj = pickle.loads(path.read_bytes())
    monkeypatch.undo()
    if name == "subprocess.Popen":
        (obj if where == "top" else obj["dataset_kwargs"]["path"]).wait()
    assert marker.exists()
    marker.unlink()
    # ... and edmlab refuses it, naming the global, with nothing run.
    with pytest.raises(UnsafePickleError, match=f"refused to load global '{name}'"):
        load_edm_pickle(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 4. round trip


def test_converted_checkpoint_round_trips_bit_for_bit(tmp_path):
    net = edm_network("ncsnpp", 10, 9)
    src = write_edm_snapshot(tmp_path / "network-snapshot-000000.pkl", net, "EDMPrecond", "ncsnpp")
    dst = tmp_path / "out" / "edm.pt"
    spec = importlib.util.spec_from_file_location("convert_edm_checkpoint", ROOT / "scripts/convert_edm_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(src), str(dst)]) == 0

    raw = torch.load(dst, weights_only=True)
    assert raw["format"] == "edmlab-denoiser" and raw["version"] == 1
    assert raw["precond"] == {"name": "edm", "sigma_data": 0.5}
    assert raw["network"]["name"] == "ncsnpp" and raw["network"]["channel_mult"] == [1, 2]
    assert raw["config"]["edm_snapshot"]["precond_class"] == "EDMPrecond"
    assert not list(tmp_path.glob("out/.*tmp"))

    original, restored = load_edm_pickle(src), load_denoiser(dst)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0])
    labels, augment = torch.tensor([0, 3, 3, 9]), torch.randn(4, 9, generator=g)
    with torch.no_grad():
        for args in ((x, sigma), (x, sigma, labels), (x, sigma, labels, augment), (x.double(), sigma)):
            assert torch.equal(original(*args), restored(*args))
    assert torch.equal(load_any(dst).denoiser(x, sigma), load_any(src).denoiser(x, sigma))


def test_save_denoiser_keeps_config_and_mlp(tmp_path):
    from omegaconf import OmegaConf

    net = build("mlp", img_resolution=1, img_channels=2, hidden_channels=8, num_blocks=1, emb_channels=8)
    D = Denoiser(net, name="fm")
    cfg = OmegaConf.create({"network": {"name": "mlp"}, "lr": 1e-3, "ref": "${lr}"})
    path = save_denoiser(D, tmp_path / "mlp.pt", config=cfg)
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == {"network": {"name": "mlp"}, "lr": 1e-3, "ref": 1e-3}
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(load_denoiser(path)(x, torch.ones(5)), D(x, torch.ones(5)))


# ---------------------------------------------------------------------------- 5. clear errors


def test_shape_mismatch_names_the_first_tensor(tmp_path):
    net = edm_network("ddpmpp", 10, 0)
    kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=10, channel_mult_emb=2,
                  **{k: v for k, v in EDM_ARCH["ddpmpp"].items() if k != "model_type"})
    path = write_edm_snapshot(tmp_path / "s.pkl", net, "EDMPrecond", "ddpmpp", model_kwargs=kwargs)
    with pytest.raises(CheckpointFormatError, match=r"'map_layer0.weight' has shape \(64, 16\) in the "
                                                    r"checkpoint but \(32, 16\)"):
        load_edm_pickle(path)

    D = Denoiser(build("ddpmpp", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2],
                       num_blocks=1))
    ckpt = tmp_path / "c.pt"
    save_denoiser(D, ckpt)
    raw = torch.load(ckpt, weights_only=True)
    raw["network"]["model_channels"] = 8  # the requested network no longer matches the weights
    torch.save(raw, ckpt)
    with pytest.raises(CheckpointFormatError, match=r"'net.map_layer0.weight' has shape \(64, 16\) .* \(32, 8\)"):
        load_denoiser(ckpt)


def test_non_edm_files_say_so(tmp_path):
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(CheckpointFormatError, match="not an EDM snapshot pickle"):
        load_edm_pickle(text)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(CheckpointFormatError, match=r"not an EDM network snapshot.*found keys \['weights'\]"):
        load_edm_pickle(other)
    edm2 = write_edm_snapshot(tmp_path / "edm2.pkl", edm_network("ddpmpp", 0, 0), "Precond", "ddpmpp")
    with pytest.raises(CheckpointFormatError, match="preconditioning class 'Precond' is not supported"):
        load_edm_pickle(edm2)

    ours = save_denoiser(Denoiser(edm_network("adm", 0, 0)), tmp_path / "ours.pt")
    with pytest.raises(CheckpointFormatError, match="torch.save archive, not an EDM snapshot.*load_denoiser"):
        load_edm_pickle(ours)
    with pytest.raises(CheckpointFormatError, match="not an edmlab checkpoint.*load_edm_pickle"):
        load_denoiser(edm2)
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6"}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointFormatError, match="Lightning training checkpoint"):
        load_denoiser(tmp_path / "last.ckpt")
    assert math.isfinite(load_any(ours).denoiser(torch.zeros(1, 3, 8, 8), 1.0).sum().item())
