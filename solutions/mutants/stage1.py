"""Mutants of Stage 1 (model/lora.py: LoRALayer): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    Variant(
        "b_random_init",
        "1.1",
        "B initialised randomly instead of zero, so a fresh adapter already changes the model.",
        (("nn.init.zeros_(self.lora_B)", "nn.init.normal_(self.lora_B, std=0.02)"),),
    ),
    Variant(
        "scaling_alpha_not_alpha_over_r",
        "1.1",
        "Scaling by lora_alpha instead of lora_alpha / r.",
        (("self.scaling = lora_alpha / r", "self.scaling = lora_alpha"),),
    ),
    Variant(
        "scaling_integer_division",
        "1.1",
        "Scaling by lora_alpha // r: wrong whenever r does not divide lora_alpha.",
        (("self.scaling = lora_alpha / r", "self.scaling = lora_alpha // r"),),
    ),
    Variant(
        "transposed_factors",
        "1.1",
        "A stored as (in, r) and B as (r, out), as some notes write them (with x @ A @ B).",
        (
            ("torch.empty(r, in_features, **placement)", "torch.empty(in_features, r, **placement)"),
            ("torch.empty(out_features, r, **placement)", "torch.empty(r, out_features, **placement)"),
            ("z = F.linear(x, self.lora_A)", "z = x @ self.lora_A"),
            ("F.linear(z, self.lora_B).to(result.dtype)", "(z @ self.lora_B).to(result.dtype)"),
            ("self.lora_B.T.to(result.dtype)", "self.lora_B.to(result.dtype)"),
            ("self.scaling * (self.lora_B @ self.lora_A)", "self.scaling * (self.lora_A @ self.lora_B).T"),
        ),
    ),
    Variant(
        "base_not_frozen",
        "1.1",
        "The wrapped base layer is left trainable.",
        (("param.requires_grad_(False)  # W0", "param.requires_grad_(True)  # W0"),),
    ),
    Variant(
        "gaussian_std_one",
        "1.1",
        "The Gaussian init draws A ~ N(0, 1) instead of N(0, 1/r^2).",
        (("nn.init.normal_(self.lora_A, std=1 / self.r)", "nn.init.normal_(self.lora_A, std=1.0)"),),
    ),
    Variant(
        "kaiming_fan_of_r",
        "1.1",
        "A drawn from U(±1/√r) (the wrong fan) instead of U(±1/√in_features).",
        (
            (
                "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))",
                "nn.init.uniform_(self.lora_A, -1 / math.sqrt(self.r), 1 / math.sqrt(self.r))",
            ),
        ),
    ),
    Variant(
        "adapters_always_fp32_on_cpu",
        "1.1",
        "A and B created with torch.empty's defaults, ignoring the base's device and dtype.",
        (("placement = adapter_placement(base_layer)", "placement = {}"),),
    ),
    Variant(
        "dropout_fixed_rate",
        "1.1",
        "The dropout module ignores lora_dropout and always drops half.",
        (
            (
                "self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()",
                "self.lora_dropout = nn.Dropout(0.5) if lora_dropout > 0 else nn.Identity()",
            ),
        ),
    ),
    Variant(
        "dropout_on_output",
        "1.2",
        "Dropout applied to the LoRA output instead of its input.",
        (
            ("x = self.lora_dropout(x).to(self.lora_A.dtype)", "x = x.to(self.lora_A.dtype)"),
            (
                "        z = F.linear(x, self.lora_A)  # (..., r)\n",
                "        return result + self.scaling * self.lora_dropout(F.linear(F.linear(x, self.lora_A), self.lora_B))\n",
            ),
        ),
    ),
    Variant(
        "dropout_without_rescaling",
        "1.2",
        "Dropout as a 0/1 mask without the 1/(1 - p) rescaling of the kept inputs.",
        (
            (
                "x = self.lora_dropout(x).to(self.lora_A.dtype)",
                "x = (self.lora_dropout(x) * (1 - getattr(self.lora_dropout, 'p', 0.0))).to(self.lora_A.dtype)",
            ),
        ),
    ),
    Variant(
        "merged_forward_adds_lora",
        "1.2",
        "The forward adds B A x even when ΔW is already merged into W0 (counted twice).",
        (("        if self.merged:\n            return result\n", ""),),
    ),
    Variant(
        "forms_delta_in_forward",
        "1.2",
        "The forward forms ΔW = B @ A on every call (the lesson says never).",
        (
            (
                "        z = F.linear(x, self.lora_A)  # (..., r)\n",
                "        return result + F.linear(x, self.delta_weight()).to(result.dtype)\n",
            ),
        ),
    ),
    Variant(
        "adds_in_place_into_any_base",
        "1.2",
        "The LoRA term is added in place into whatever the base layer returned.",
        (("        if not adds_in_place_safely(self.base_layer):\n", "        if False:\n"),),
    ),
    Variant(
        "lora_term_not_cast",
        "1.2",
        "The fused add does not cast the LoRA term to the output's dtype (fails under autocast).",
        (
            (
                "z.reshape(-1, self.r).to(result.dtype), self.lora_B.T.to(result.dtype)",
                "z.reshape(-1, self.r), self.lora_B.T",
            ),
        ),
    ),
    Variant(
        "input_cast_to_float32",
        "1.2",
        "The input is cast to float32 instead of the adapters' dtype (a float64 layer breaks).",
        (("x = self.lora_dropout(x).to(self.lora_A.dtype)", "x = self.lora_dropout(x).float()"),),
    ),
    Variant(
        "merge_without_scaling",
        "1.3",
        "merge() adds B @ A without the lora_alpha / r scaling.",
        (
            (
                "            weight += self.delta_weight().to(weight.dtype)",
                "            weight += (self.lora_B @ self.lora_A).to(weight.dtype)",
            ),
        ),
    ),
    Variant(
        "merge_twice_adds_twice",
        "1.3",
        "merge() has no merged guard, so a second call adds ΔW again.",
        (("        if self.merged:\n            return\n        weight", "        weight"),),
    ),
    Variant(
        "unmerge_adds",
        "1.3",
        "unmerge() adds ΔW again instead of subtracting it.",
        (("weight -= self.delta_weight()", "weight += self.delta_weight()"),),
    ),
    Variant(
        "unmerge_without_guard",
        "1.3",
        "unmerge() subtracts ΔW even when the layer is not merged.",
        (("        if not self.merged:\n            return\n        weight", "        weight"),),
    ),
    Variant(
        "merge_outside_no_grad",
        "1.3",
        "merge() adds ΔW outside torch.no_grad(): the weight gets a grad_fn and requires grad.",
        (
            (
                "        with torch.no_grad():\n            weight += self.delta_weight().to(weight.dtype)\n",
                "        weight += self.delta_weight().to(weight.dtype)\n",
            ),
        ),
    ),
    Variant(
        "merge_replaces_the_parameter",
        "1.3",
        "merge() replaces the weight by a new trainable nn.Parameter.",
        (
            (
                "        with torch.no_grad():\n            weight += self.delta_weight().to(weight.dtype)\n",
                "        self.base_layer.weight = nn.Parameter((weight + self.delta_weight()).detach().to(weight.dtype))\n",
            ),
        ),
    ),
    Variant(
        "merge_upcasts_a_bf16_weight",
        "1.3",
        "merge() replaces a half-precision weight by a float32 one.",
        (
            (
                "        with torch.no_grad():\n            weight += self.delta_weight().to(weight.dtype)\n",
                "        with torch.no_grad():\n"
                "            self.base_layer.weight = nn.Parameter(weight.float() + self.delta_weight(), requires_grad=False)\n",
            ),
        ),
    ),
    # Promises of lesson 01 that the suites grade (issue: every promise graded).
    Variant(
        "attribute_renamed",
        "1.1",
        "lora_alpha is stored as self.alpha (the given repr and save_lora read lora_alpha).",
        (("        self.r, self.lora_alpha = r, lora_alpha", "        self.r, self.alpha = r, lora_alpha"),),
    ),
    Variant(
        "reset_accepts_any_init",
        "1.1",
        "reset_lora_parameters treats an unknown init as Kaiming instead of refusing it.",
        (
            (
                '                raise ValueError(f"init_lora_weights must be one of {INIT_METHODS}, got {init_lora_weights!r}")',
                "                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))",
            ),
        ),
    ),
    Variant(
        "eval_merges_like_loralib",
        "1.3",
        "train(False) merges and train(True) unmerges, as loralib does.",
        (
            (
                "    def extra_repr(self) -> str:",
                "    def train(self, mode: bool = True):\n        super().train(mode)\n"
                "        if isinstance(self.base_layer, nn.Linear):\n            (self.unmerge if mode else self.merge)()\n"
                "        return self\n\n    def extra_repr(self) -> str:",
            ),
        ),
    ),
    # ---- issue 19 item 7: bugs of the classes the earlier suites missed (shapes, dtypes, layouts, refusals) ----
    Variant(
        "forward_fused_add_flattens_batch_dims",
        "1.2",
        "The fused add flattens the batch with flatten(0, -2): a 1-D x (one token, no batch dimension) raises.",
        (
            (
                "        result.view(-1, self.out_features).addmm_(\n"
                "            z.reshape(-1, self.r).to(result.dtype), self.lora_B.T.to(result.dtype), alpha=self.scaling\n"
                "        )",
                "        result.flatten(0, -2).addmm_(\n"
                "            z.flatten(0, -2).to(result.dtype), self.lora_B.T.to(result.dtype), alpha=self.scaling\n"
                "        )",
            ),
        ),
    ),
    Variant(
        "lora_term_squeezed",
        "1.2",
        "The out-of-place LoRA term is squeeze()d: with out_features = 1 (or r = 1) it broadcasts to the wrong shape.",
        (
            (
                "F.linear(z, self.lora_B).to(result.dtype)  # (..., out)",
                "F.linear(z, self.lora_B).squeeze().to(result.dtype)  # (..., out)",
            ),
        ),
    ),
    Variant(
        "forward_views_input",
        "1.2",
        "The LoRA path flattens x with view(-1, in_features): a transposed or strided input raises.",
        (
            (
                "        z = F.linear(x, self.lora_A)  # (..., r)",
                "        z = F.linear(x.view(-1, self.in_features), self.lora_A).view(*x.shape[:-1], self.r)  # (..., r)",
            ),
        ),
    ),
    Variant(
        "lora_out_of_place_term_not_cast",
        "1.2",
        "The out-of-place sum does not cast the LoRA term: a bf16 base that is not an nn.Linear gives a float32 output.",
        (
            (
                "return result + self.scaling * F.linear(z, self.lora_B).to(result.dtype)  # (..., out)",
                "return result + self.scaling * F.linear(z, self.lora_B)  # (..., out)",
            ),
        ),
    ),
    Variant(
        "lora_layer_freezes_before_checking",
        "1.1",
        "The base is frozen before the arguments are checked: a refused LoRALayer leaves the caller's layer frozen.",
        (
            (
                "        check_lora_args(in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights)\n"
                "        if base_layer is None:\n"
                "            base_layer = nn.Linear(in_features, out_features)\n"
                "        for param in base_layer.parameters():\n"
                "            param.requires_grad_(False)  # W0 (and its bias) stay frozen\n",
                "        if base_layer is None:\n"
                "            base_layer = nn.Linear(in_features, out_features)\n"
                "        for param in base_layer.parameters():\n"
                "            param.requires_grad_(False)  # W0 (and its bias) stay frozen\n"
                "        check_lora_args(in_features, out_features, r, lora_alpha, lora_dropout, init_lora_weights)\n",
            ),
        ),
    ),
    Variant(
        "reset_zeroes_b_before_checking",
        "1.1",
        "reset_lora_parameters zeroes B first and checks the init name after: a refused reset has already wiped B.",
        (
            (
                '        with torch.no_grad():\n            if init_lora_weights == "kaiming":',
                '        with torch.no_grad():\n            nn.init.zeros_(self.lora_B)\n            if init_lora_weights == "kaiming":',
            ),
        ),
    ),
]
