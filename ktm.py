"""Knowledge-transfer modules (KTMs) and the Up-G `Generalist` (INTERN, DESIGN.md §5.4).

The generalist runs several experts of the same architecture side by side on the same image:
one *main* stream and N *auxiliary* streams. After each of the main stream's levels k = 0, 1, 2
(not the last one), every auxiliary stream adds what its KTM makes of its own levels j <= k:

    G_k  <-  G_k + sum_aux sum_{j <= k} T_{j->k}( stopgrad(E_j) )

and the main stream continues from the fused G_k, so the transfer reaches every deeper block and
the pooled feature. This is the `crossconvhrnetlayer` of INTERN's released Up-G code (HRNet-style
multi-resolution fusion, a plain sum; reference/intern.md §5.2):

    T_{j->k}, same stride        BN( Conv1x1(C_j -> C_k) )
    T_{j->k}, stride ratio 2^n   BN(Conv3x3 s2 (C_j -> C_k)) o [ReLU(BN(Conv3x3 s2 (C_j -> C_j)))]^(n-1)

On MetaNet (strides 4, 8, 16) n = k - j. A ViT (EVA) has every level at the patch stride, so
n = 0 for all pairs: each T_{j->k} is a Conv1x1 + BN, the same-level form -- the released design
down-samples only to match strides, and there is nothing to match (our reading; INTERN shipped
CNN generalists only).

Initialisation (zero_init="all", the released code): conv weights ~ N(0, 1e-3) and every BN
gamma = beta = 0, so each KTM outputs exactly zero and a fresh generalist reproduces its main
expert bit for bit; training grows the transfer as a residual. Gradients reach the BN affines
first (the convs sit behind gamma = 0). A quirk of that init: in a path of two or more hops the
first hop outputs ReLU(0) = 0, and ReLU has no gradient at 0, so the path can never learn more
than its last BN's bias (on MetaNet: stride 4 -> 16; a ViT has no such path). zero_init="last"
zeroes only the last BN of each path (the others start at gamma = 1): still an exact zero at
the start, and every path learns. The default stays faithful to the release.

What Up-G trains (not in the paper): here the experts are frozen, the KTMs (+ task heads) learn;
`train_main=True` also unfreezes the main stream. Auxiliary experts always run in eval mode under
no_grad, only up to the last KTM level.
"""
import math

import torch
import torch.nn as nn

KTM_LEVELS = (0, 1, 2)      # after levels 1, 2, 3 of the paper's numbering; none after the last
ZERO_INITS = ("all", "last")


def _conv_bn(c_in: int, c_out: int, k: int, stride: int) -> list:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)]


def transfer(c_in: int, c_out: int, stride_in: int, stride_out: int) -> nn.Sequential:
    """T_{j->k}: a source map (B, c_in, H, W) at stride_in -> (B, c_out, H', W') at stride_out."""
    ratio = stride_out / stride_in
    n = round(math.log2(ratio)) if ratio >= 1 else -1
    if n < 0 or 2 ** n != ratio:
        raise ValueError(f"a KTM can only down-sample by a power of 2: source stride {stride_in} -> "
                         f"target stride {stride_out}; give the auxiliary expert levels at strides that "
                         f"divide the main stream's (same architecture works)")
    if n == 0:
        return nn.Sequential(*_conv_bn(c_in, c_out, 1, 1))
    layers = []
    for _ in range(n - 1):        # intermediate hops keep the source width, ReLU between convs only
        layers += _conv_bn(c_in, c_in, 3, 2) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *_conv_bn(c_in, c_out, 3, 2))


class KTM(nn.Module):
    """The transfer into main level k from one auxiliary stream: sum_{j<=k} T_{j->k}(E_j)."""

    def __init__(self, k: int, src_channels, src_strides, dst_channels, dst_strides, zero_init: str = "all"):
        super().__init__()
        if zero_init not in ZERO_INITS:
            raise ValueError(f"zero_init={zero_init!r}; choose one of {list(ZERO_INITS)}")
        self.k, self.zero_init = k, zero_init
        self.paths = nn.ModuleList([transfer(src_channels[j], dst_channels[k], src_strides[j], dst_strides[k])
                                    for j in range(k + 1)])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for path in self.paths:
            for m in path:
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 1e-3)
                elif isinstance(m, nn.BatchNorm2d):
                    # gamma = beta = 0 on the last BN makes the path an exact zero
                    zero = self.zero_init == "all" or m is path[-1]
                    nn.init.constant_(m.weight, 0.0 if zero else 1.0)
                    nn.init.zeros_(m.bias)

    def forward(self, feats):
        """feats: the auxiliary levels E_0..E_k (detached) -> (B, C_k, H_k, W_k) to add to G_k."""
        out = 0
        for j, path in enumerate(self.paths):
            out = out + path(feats[j])
        return out


def ktm_set(aux: nn.Module, main: nn.Module, zero_init: str = "all") -> nn.ModuleList:
    """One KTM per KTM level for one auxiliary stream (aux geometry -> main geometry)."""
    return nn.ModuleList([KTM(k, aux.level_channels, aux.level_strides, main.level_channels,
                              main.level_strides, zero_init) for k in KTM_LEVELS])


class _Stop(Exception):
    """Raised from inside an auxiliary forward once the last needed level is out: the remaining
    (deepest, often largest) blocks of an auxiliary expert are never used, so they are not run."""


@torch.no_grad()
def aux_levels(backbone: nn.Module, x: torch.Tensor, last: int = KTM_LEVELS[-1]) -> list:
    """Levels 0..last of a backbone, without computing the rest of it."""
    feats = []

    def grab(k, fmap):
        feats.append(fmap.detach())
        if k == last:
            raise _Stop
        return fmap

    try:
        backbone.forward_levels(x, inject=grab)
    except _Stop:
        pass
    return feats


class Generalist(nn.Module):
    """Main expert + auxiliary experts joined by KTMs; a backbone by the contract (DESIGN §4.1).

    main: the expert whose stream produces the outputs (its levels after fusion, its pooled
          feature); frozen (requires_grad False, eval mode) unless train_main.
    aux:  {name: expert}, run in eval mode under no_grad; their order is the summation order.
    zero_init: "all" (released) or "last", how new KTMs start (see the module docstring).
    The backbones are taken over, not copied (their requires_grad flags are set here).
    state dict: main.*, aux.<name>.*, ktms.<name>.<level index>.paths.<j>.*"""

    def __init__(self, main: nn.Module, aux: dict = None, train_main: bool = False, main_name: str = "main",
                 zero_init: str = "all"):
        super().__init__()
        if zero_init not in ZERO_INITS:
            raise ValueError(f"zero_init={zero_init!r}; choose one of {list(ZERO_INITS)}")
        self.main = main
        self.main_name, self.train_main, self.zero_init = main_name, train_main, zero_init
        self.aux = nn.ModuleDict()
        self.ktms = nn.ModuleDict()
        main.requires_grad_(train_main)
        for name, backbone in (aux or {}).items():
            self.add_expert(name, backbone)
        self.train(self.training)

    # backbone contract: the main stream's geometry
    @property
    def level_channels(self):
        return self.main.level_channels

    @property
    def level_strides(self):
        return self.main.level_strides

    @property
    def num_features(self):
        return self.main.num_features

    @property
    def img_size(self):
        return self.main.img_size

    def block_list(self) -> list:
        return self.main.block_list()

    def set_grad_checkpointing(self, enable: bool = True):
        self.main.set_grad_checkpointing(enable)     # the auxiliary streams never keep a graph

    def no_weight_decay(self) -> set:
        skip = getattr(self.main, "no_weight_decay", lambda: set())()
        return {f"main.{n}" for n in skip}

    def add_expert(self, name: str, backbone: nn.Module):
        """Append one auxiliary stream and one new zero-initialised KTM set (C-D -> C-D-S);
        every existing module is left untouched, so the output is unchanged until it trains."""
        if not name or "." in name or name in self.aux or name == self.main_name:
            raise ValueError(f"expert name {name!r} must be new, non-empty and without '.'; "
                             f"taken: {[self.main_name] + list(self.aux)}")
        if len(backbone.level_channels) != 4 or len(self.main.level_channels) != 4:
            raise ValueError("KTMs need backbones with 4 levels (forward_levels contract)")
        backbone.requires_grad_(False)
        self.aux[name] = backbone.eval()
        ref = next(self.main.parameters(), None)
        device = ref.device if ref is not None else "cpu"
        self.ktms[name] = ktm_set(backbone, self.main, self.zero_init).to(device)

    def train(self, mode: bool = True):
        super().train(mode)
        for backbone in self.aux.values():
            backbone.eval()                      # auxiliary BN statistics / drop path never move
        if not self.train_main:
            self.main.eval()                     # a frozen expert stays exactly the expert
        return self

    def config(self) -> dict:
        """What a checkpoint needs to rebuild the wrapper (stream names in summation order)."""
        return {"main": self.main_name, "aux": list(self.aux), "train_main": self.train_main,
                "zero_init": self.zero_init, "ktm_levels": list(KTM_LEVELS)}

    def forward_levels(self, x: torch.Tensor, inject=None):
        """(levels, pooled) of the main stream with the KTM transfer added after levels 0..2;
        a caller's `inject(k, fmap)` is applied after the transfer."""
        feats = {name: aux_levels(backbone, x) for name, backbone in self.aux.items()}

        def fuse(k, fmap):
            if k in KTM_LEVELS and self.aux:
                delta = 0
                for name in self.aux:
                    delta = delta + self.ktms[name][KTM_LEVELS.index(k)](feats[name][:k + 1])
                fmap = fmap + delta
            return inject(k, fmap) if inject is not None else fmap

        return self.main.forward_levels(x, inject=fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature of the fused main stream (B, num_features)."""
        return self.forward_levels(x)[1]
