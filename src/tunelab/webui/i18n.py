"""Web UI (top of the pipeline): English and Chinese texts and the language switch.

Every label, hint and button text of the UI is looked up here by key; `Localizer` remembers which component
shows which key so the language radio can relabel the whole page in one event. Config field labels stay the
YAML key names (so the form and the YAML file read the same); their hints are the schema's Field descriptions,
with Chinese versions in FIELD_ZH.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LANGUAGES = {"en": "English", "zh": "中文"}

# key -> (English, Chinese)
TEXTS: dict[str, tuple[str, str]] = {
    "title": ("tunelab: fine-tune LLMs from data to deployment", "tunelab：从数据到部署的大模型微调"),
    "lang": ("Language", "语言"),
    "tab.data": ("Data", "数据"),
    "tab.train": ("Train", "训练"),
    "tab.eval": ("Evaluate", "评估"),
    "tab.chat": ("Chat", "对话"),
    "tab.export": ("Export", "导出"),
    # data tab
    "data.path": ("Data file, folder or glob", "数据文件、文件夹或通配符"),
    "data.path.info": ("jsonl/json/csv/parquet/txt; leave empty to use a registered dataset",
                       "jsonl/json/csv/parquet/txt；留空则使用已注册的数据集"),
    "data.upload": ("...or upload a file", "……或上传文件"),
    "data.dataset_dir": ("Dataset folder (dataset_info.json)", "数据集目录（dataset_info.json）"),
    "data.name": ("Registered dataset", "已注册的数据集"),
    "data.refresh": ("Reload dataset list", "刷新数据集列表"),
    "data.model": ("Model (tokenizer and chat template)", "模型（分词器与对话模板）"),
    "data.template": ("Chat template", "对话模板"),
    "data.cutoff": ("Cutoff length (tokens)", "截断长度（token）"),
    "data.train_on": ("Tokens that carry loss", "计算损失的 token"),
    "data.format": ("Record format", "记录格式"),
    "data.examples": ("Examples shown", "显示样例数"),
    "data.prepare": ("Prepare and preview", "处理并预览"),
    "data.use": ("Use in the Train form", "用于训练表单"),
    "data.summary": ("Summary", "统计摘要"),
    "data.prepared": ("{train} train, {validation} validation · template {template} · {fingerprint}",
                      "训练 {train} 条，验证 {validation} 条 · 模板 {template} · {fingerprint}"),
    "data.example_head": ("#{i} · {tokens} tokens · {trained} trained", "#{i} · {tokens} 个 token · {trained} 个参与训练"),
    "hist.title": ("Tokens per example ({n} examples)", "每个样例的 token 数（共 {n} 个样例）"),
    "hist.x": ("tokens per example", "每个样例的 token 数"),
    "hist.y": ("examples", "样例数"),
    "hist.cutoff": ("cutoff_len {n}", "cutoff_len {n}"),
    "hist.beyond": ("longer than every example, max {n}", "超过所有样例，最长 {n}"),
    "sum.what": ("Item", "项目"),
    "sum.value": ("Value", "数值"),
    "sum.template": ("template", "对话模板"),
    "sum.template.v": ("{name} (ends turns with {stops})", "{name}（轮次结束符 {stops}）"),
    "sum.dataset": ("dataset {name}", "数据集 {name}"),
    "sum.dataset.v": ("{read} read, {rejected} rejected, {kept} kept", "读取 {read}，拒绝 {rejected}，保留 {kept}"),
    "sum.records_read": ("records read", "读取记录数"),
    "sum.rejected": ("rejected", "被拒绝"),
    "sum.cleaning": ("cleaning: {rule}", "清洗：{rule}"),
    "sum.conversations": ("conversations", "对话数"),
    "sum.examples": ("examples", "样例数"),
    "sum.examples.v": ("{n} (train {train}, validation {validation})", "{n}（训练 {train}，验证 {validation}）"),
    "sum.truncated": ("truncated", "被截断"),
    "sum.truncated.v": ("{n} (cutoff_len {cutoff})", "{n}（cutoff_len {cutoff}）"),
    "sum.chunked": ("documents split into chunks", "被切分的文档"),
    "sum.dropped": ("dropped (nothing to train)", "丢弃（无可训练 token）"),
    "sum.tokens": ("tokens", "token 数"),
    "sum.tokens.v": ("{n} ({trained} trained)", "{n}（{trained} 个参与训练）"),
    "sum.no_end": ("replies without end-of-turn", "缺少轮次结束符的回复"),
    "sum.length": ("length p50 / p90 / p99 / max", "长度 p50 / p90 / p99 / 最大"),
    "sum.rejects_file": ("rejects file", "拒绝记录文件"),
    "sum.cache": ("cache", "缓存"),
    "sum.cache.reused": ("reused", "复用"),
    "sum.cache.written": ("written", "新写入"),
    "rejects.title": ("rejects: {n}", "被拒绝的记录：{n}"),
    "rejects.record": ("record", "记录"),
    "rejects.field": ("field", "字段"),
    "rejects.rule": ("rule", "规则"),
    "rejects.reason": ("reason", "原因"),
    "data.legend": ("Highlighted text is trained (carries loss); grey text is context only.",
                    "高亮部分参与训练（计算损失）；灰色部分仅作上下文。"),
    "data.kept": ("Uploaded file kept as {path} (the folder name is its SHA-256; runs record this path)",
                  "上传的文件已保存为 {path}（目录名即其 SHA-256；运行记录的是这个路径）"),
    "data.used": ("The Train form now uses this data.", "训练表单已使用该数据。"),
    # train tab
    "train.section.run": ("Stage", "训练阶段"),
    "train.section.align": ("Alignment (stages other than sft)", "偏好对齐（sft 以外的阶段）"),
    "train.section.model": ("Model", "模型"),
    "train.section.data": ("Data", "数据"),
    "train.section.method": ("Method", "微调方法"),
    "train.section.train": ("Training hyperparameters", "训练超参数"),
    "train.yaml_path": ("Config YAML path", "配置 YAML 路径"),
    "train.save": ("Save as YAML", "保存为 YAML"),
    "train.load": ("Load YAML", "加载 YAML"),
    "train.preview": ("Preview YAML", "预览 YAML"),
    "train.yaml": ("Config (what `tunelab train` will read)", "配置（`tunelab train` 读取的内容）"),
    "train.start": ("Start", "开始训练"),
    "train.stop": ("Stop", "停止"),
    "train.resume": ("Resume from the last checkpoint", "从最近的检查点继续"),
    "train.log": ("Log", "日志"),
    "train.loss": ("Loss", "损失曲线"),
    "train.series.train": ("train", "训练集"),
    "train.series.validation": ("validation", "验证集"),
    "train.series.reward_accuracy": ("reward accuracy", "奖励准确率"),
    "train.series.validation_reward_accuracy": ("validation reward accuracy", "验证集奖励准确率"),
    "train.axis.step": ("step", "步数"),
    "train.axis.loss": ("loss", "损失"),
    "train.axis.series": ("split", "数据划分"),
    "train.progress": ("Progress", "进度"),
    "train.saved": ("Saved {path}", "已保存 {path}"),
    "train.loaded": ("Loaded {path}", "已加载 {path}"),
    "train.started": ("Started: {cmd}", "已启动：{cmd}"),
    "train.busy": ("A training run is already going; stop it first.", "已有训练在运行，请先停止。"),
    "train.idle": ("No training run.", "没有正在进行的训练。"),
    "train.stopping": ("Stopping: the trainer saves a resumable checkpoint first.",
                       "正在停止：训练器会先保存可恢复的检查点。"),
    "status.running": ("running", "运行中"),
    "status.finished": ("finished", "已完成"),
    "status.failed": ("failed", "失败"),
    "status.stopped": ("stopped", "已停止"),
    "status.stopping": ("stopping", "停止中"),
    "progress.step": ("step", "步"),
    "progress.eta": ("ETA", "剩余时间"),
    "progress.elapsed": ("elapsed", "已用时"),
    "progress.run": ("run folder", "运行目录"),
    # evaluate tab
    "eval.runs_dir": ("Runs folder", "运行目录"),
    "eval.refresh": ("Refresh runs", "刷新运行列表"),
    "eval.model": ("Run or model", "运行或模型"),
    "eval.model.info": ("A run folder, adapter, merged folder, hub id or .gguf", "运行目录、适配器、合并后的模型、Hub ID 或 .gguf"),
    "eval.data": ("Evaluation data (empty: the run's validation split)", "评估数据（留空：使用运行的验证集）"),
    "eval.metrics": ("Metrics", "指标"),
    "eval.max_samples": ("Max examples", "最多样例数"),
    "eval.max_new_tokens": ("Max new tokens", "最多生成 token 数"),
    "eval.run": ("Evaluate", "开始评估"),
    "eval.table": ("Metrics", "指标"),
    "eval.examples": ("Examples", "样例"),
    "eval.compare_runs": ("Runs to compare", "要对比的运行"),
    "eval.compare": ("Compare runs", "对比运行"),
    "eval.compare_models": ("Compare on the same data", "在同一数据上对比评估"),
    "eval.col.metric": ("metric", "指标"),
    "eval.col.value": ("value", "数值"),
    "eval.col.best": ("best", "最佳"),
    "eval.col.setting": ("setting", "设置"),
    "eval.q": ("Q", "问题"),
    "eval.ref": ("ref", "参考答案"),
    "eval.pred": ("pred", "模型输出"),
    "eval.done": ("{model}: {n} examples", "{model}：{n} 个样例"),
    "eval.diff": ("Config differences", "配置差异"),
    # chat tab
    "chat.model": ("Model", "模型"),
    "chat.model.info": ("Base model, run folder, adapter, merged folder or .gguf",
                        "基座模型、运行目录、适配器、合并后的模型或 .gguf"),
    "chat.adapter": ("Adapter (optional)", "适配器（可选）"),
    "chat.base": ("Base model for side by side (empty: the run's base)", "并排对比的基座模型（留空：运行的基座）"),
    "chat.load": ("Load", "加载模型"),
    "chat.unload": ("Unload", "卸载模型"),
    "chat.side": ("Side by side: base and tuned", "并排对比：基座与微调"),
    "chat.system": ("System prompt", "系统提示词"),
    "chat.temperature": ("Temperature (0: greedy)", "温度（0：贪心）"),
    "chat.top_p": ("Top-p", "Top-p"),
    "chat.max_new_tokens": ("Max new tokens", "最多生成 token 数"),
    "chat.repetition_penalty": ("Repetition penalty", "重复惩罚"),
    "chat.message": ("Message", "消息"),
    "chat.send": ("Send", "发送"),
    "chat.clear": ("Clear", "清空"),
    "chat.tuned": ("Tuned", "微调模型"),
    "chat.base_label": ("Base", "基座模型"),
    "chat.loaded": ("Loaded {name} ({seconds:.1f} s)", "已加载 {name}（{seconds:.1f} 秒）"),
    "chat.not_loaded": ("Load a model first.", "请先加载模型。"),
    "chat.unloaded": ("Unloaded.", "已卸载。"),
    # export tab
    "export.model": ("Run, adapter or model to export", "要导出的运行、适配器或模型"),
    "export.output": ("Output folder (empty: <run>/export)", "输出目录（留空：<运行>/export）"),
    "export.dtype": ("Merged weights dtype", "合并后的权重精度"),
    "export.gguf": ("GGUF types", "GGUF 类型"),
    "export.ollama": ("Ollama Modelfile", "Ollama Modelfile"),
    "export.quantize": ("Quantized copy after merging", "合并后另存量化副本"),
    "export.verify": ("Reload each GGUF and compare answers", "重新加载 GGUF 并对比回答"),
    "export.run": ("Export", "导出"),
    "export.files": ("Written files", "输出文件"),
    "export.size": ("Size", "大小"),
    "export.dtype.info": ("auto: the dtype the base model was released in (bf16/fp16); float32 only if chosen",
                          "auto：基座模型发布时的精度（bf16/fp16）；只有选择时才用 float32"),
    "export.ollama.info": ("Needs a GGUF: q8_0 is ticked when no GGUF type is", "需要 GGUF：未选 GGUF 类型时自动勾选 q8_0"),
    "export.overwrite": ("Overwrite a non-empty output folder", "覆盖非空的输出目录"),
    "export.overwrite.info": ("Replaces the whole folder, atomically (the old one stays until the export is done)",
                              "整体替换该目录（原子操作：导出完成前旧目录保持不变）"),
    "export.plan": ("Export will write into {out}:", "导出将写入 {out}："),
    "export.plan.merged": ("merged model (safetensors, tokenizer, chat template), dtype {dtype}",
                           "合并后的模型（safetensors、分词器、对话模板），精度 {dtype}"),
    "export.plan.modelfile": ("gguf/Modelfile (Ollama, FROM the smallest GGUF)", "gguf/Modelfile（Ollama，使用最小的 GGUF）"),
    "export.plan.quantized": ("{method}/ (quantized copy after merging)", "{method}/（合并后的量化副本）"),
    "export.kind.merged": ("adapter merged into the base", "适配器已合并进基座"),
    "export.kind.full": ("full model (no adapter)", "完整模型（无适配器）"),
    "export.kind.prefix": ("base + prefix adapter (prefix tuning cannot be merged)",
                           "基座 + 前缀适配器（前缀微调无法合并）"),
    "export.template": ("chat template", "对话模板"),
    "export.identical": ("identical to training", "与训练时一致"),
    "export.differs": ("DIFFERS: ", "不一致："),
    "export.modelfile": ("Modelfile {path} (ollama create NAME -f {path})", "Modelfile {path}（ollama create 名称 -f {path}）"),
    "export.round_trip": ("GGUF {name}: {identical}/{total} greedy answers identical",
                          "GGUF {name}：{identical}/{total} 个贪心解码回答一致"),
    "export.note": ("note", "说明"),
    "export.note.prefix": (("prefix tuning adds learned key/value vectors at every layer: they cannot be merged into "
                           "the weights, so the export is the base model plus prefix_adapter/; GGUF and Ollama cannot "
                           "run it"), ("前缀微调在每一层加入学习到的 key/value 向量，无法合并进权重，因此导出的是基座模型加 "
                           "prefix_adapter/；GGUF 和 Ollama 无法运行它")),
    "export.note.no_template": ("the Modelfile has no TEMPLATE: unknown chat template family (see the Modelfile)",
                                "Modelfile 没有 TEMPLATE：无法识别对话模板的类型（见 Modelfile）"),
    "export.refused.user": (("Not exported: {folder} is not empty and was not written by tunelab. Choose a new output "
                            "folder, or tick \"Overwrite a non-empty output folder\" to replace the whole folder."),
                            ("未导出：{folder} 不是空目录，且不是 tunelab 写入的。请换一个输出目录，或勾选"
                            "“覆盖非空的输出目录”以替换整个目录。")),
    "export.refused.export": (("Not exported: {folder} already holds a tunelab export. Tick \"Overwrite a non-empty "
                              "output folder\" to replace it, or choose a new output folder."),
                              ("未导出：{folder} 中已有 tunelab 导出的模型。勾选“覆盖非空的输出目录”以替换它，"
                              "或换一个输出目录。")),
    "export.table.artifact": ("Artifact", "产物"),
    "export.table.size": ("Size", "大小"),
    "export.table.perplexity": ("Perplexity (held-out data)", "困惑度（留出数据）"),
    "export.table.speed": ("Tokens/s (this machine)", "每秒 token 数（本机）"),
    "export.table.no_speed": ("- (needs the llama.cpp runtime)", "-（需要 llama.cpp 运行时）"),
    "export.missing_source": ("choose what to export: a run folder, an adapter or a model folder",
                              "请选择要导出的内容：运行目录、适配器或模型目录"),
    # shared
    "form.none": ("(none)", "（无）"),
    "form.default": ("(default)", "（默认）"),
    "threads": ("CPU threads", "CPU 线程数"),
    "threads.info": ("for chat and evaluation in this page's process (default: as training)",
                     "本页面进程中对话与评估使用（默认与训练相同）"),
    "threads.set": ("Chat and evaluation now use {n} CPU threads.", "对话与评估现在使用 {n} 个 CPU 线程。"),
    "error": ("Error", "错误"),
    "unexpected": ("Unexpected error (details in the server log)", "意外错误（详情见服务器日志）"),
    "done": ("Done in {seconds:.1f} s", "完成，用时 {seconds:.1f} 秒"),
    "missing": ("This part of tunelab is not installed in this version: {what}", "当前版本未包含该功能：{what}"),
}

# Chinese hints for the config fields shown in the Train form; English comes from the schema's descriptions.
FIELD_ZH: dict[str, str] = {
    "model.name": "本地 Hugging Face 目录、Hub ID 或 .gguf 文件。默认离线解析为内置的 SmolLM2-135M-Instruct。",
    "model.revision": "Hub 模型的版本（分支、标签或提交）。",
    "model.gguf_file": "当 name 是目录时，其中的 GGUF 文件名。",
    "model.dtype": "权重精度。auto：CPU/MPS 上用 float32，支持的 GPU 上用 bfloat16，否则 float16。",
    "model.device": "运行设备。auto 依次选择 cuda、mps、cpu。",
    "model.attn_implementation": "传给 transformers 的注意力实现。",
    "model.trust_remote_code": "运行模型仓库自带的代码（ChatGLM、Baichuan）。",
    "model.cache_dir": "转换后模型的缓存目录（默认 ~/.cache/tunelab）。",
    "data.datasets": "要混合的数据集（YAML 列表，每项 path 或 name）。",
    "data.dataset_dir": "包含 LLaMA-Factory 兼容 dataset_info.json 的目录，用于按 name 指定的数据集。",
    "data.template": "对话模板：auto（分词器自带，否则 chatml）、已注册名称或 .jinja 文件路径。",
    "data.system": "记录没有系统提示词时使用的默认值。",
    "data.enable_thinking": "Qwen3 类模板：是否渲染思考内容。",
    "data.variables": "替换记录中 {name} 占位符的值（如自我认知数据中的 name、author）。",
    "data.cutoff_len": "每个样例的最大 token 数；更长的会被截断（纯文本文档见 long_text）。",
    "data.long_text": "超过 cutoff_len 的纯文本文档：切成连续的 cutoff_len 长度样例（不丢内容），或像对话一样截断。",
    "data.train_on": "哪些 token 计算损失：所有助手回复、仅最后一轮或全部 token。",
    "data.packing": "无填充打包：每个批次把样例拼成一行。",
    "data.val_size": "验证集大小：小于 1 为比例，大于等于 1 为条数。",
    "data.seed": "打乱与划分的随机种子。",
    "data.max_reject_ratio": "被拒绝记录的比例超过此值时报错。",
    "data.strict": "遇到第一条错误记录就失败，而不是跳过。",
    "data.clean": "清洗选项（YAML）。",
    "data.cache_dir": "处理后数据的缓存目录（默认 ~/.cache/tunelab/data）。",
    "data.num_proc": "分词使用的进程数。",
    "method.name": "微调方法：下拉列表列出所有已注册的方法。",
    "method.r": "LoRA 秩。",
    "method.alpha": "LoRA 缩放系数 alpha。",
    "method.dropout": "LoRA 输入上的 dropout。",
    "method.target_modules": "要适配的模块名（逗号分隔），或 all-linear。",
    "method.rslora": "秩稳定缩放 alpha/sqrt(r)。",
    "method.modules_to_save": "额外全量训练并保存的模块（逗号分隔）。",
    "method.init_from": "从已有的适配器目录开始（新的运行，而非继续）。",
    "method.bits": "冻结基座的量化位数。",
    "method.quant_type": "4 比特数据类型。",
    "method.double_quant": "对量化常数再做一次量化。",
    "method.compute_dtype": "矩阵乘法精度。",
    "method.trainable_layers": "训练最后 N 个解码层（0：不训练）。",
    "method.trainable_modules": "另外训练名称包含这些字符串的参数（如 lm_head，逗号分隔）。",
    "method.num_virtual_tokens": "每层的虚拟 key/value token 数。",
    "method.projection": "P-Tuning v2：通过 MLP 重参数化。",
    "method.encoder_hidden_size": "投影 MLP 的隐藏层大小（默认与模型相同）。",
    "train.output_dir": "运行写入 output_dir/run_name。",
    "train.run_name": "运行目录名（默认：时间戳 + 模型 + 方法）。",
    "train.epochs": "训练轮数（max_steps > 0 时忽略）。",
    "train.max_steps": "训练到这么多优化步后停止（-1：按轮数）。",
    "train.batch_size": "每个设备每步的样例数。",
    "train.grad_accum": "梯度累积步数。",
    "train.lr": "峰值学习率。",
    "train.scheduler": "学习率调度。",
    "train.warmup_ratio": "预热步数占总步数的比例。",
    "train.warmup_steps": "预热步数（大于 0 时覆盖 warmup_ratio）。",
    "train.weight_decay": "权重衰减。",
    "train.max_grad_norm": "梯度裁剪（0：关闭）。",
    "train.seed": "随机种子。",
    "train.gradient_checkpointing": "重新计算激活以节省显存。",
    "train.logging_steps": "每 N 步记录一次日志。",
    "train.eval_steps": "每 N 步评估一次（默认每轮一次）。",
    "train.save_steps": "每 N 步保存检查点（默认每轮一次）。",
    "train.save_total_limit": "保留的检查点数量。",
    "train.early_stopping_patience": "连续 N 次评估没有提升就停止。",
    "train.report_to": "实验跟踪：tensorboard、wandb、swanlab、mlflow（逗号分隔）。",
    "train.mixed_precision": "auto：设备支持时用 bf16 自动混合精度，否则不用。",
    "train.group_by_length": "不打包时：把长度相近的样例放在同一批，减少填充。",
    "train.torch_compile": "用 torch.compile 编译模型。",
    "train.threads": "torch 使用的 CPU 线程数（默认：每个可用核心一个）。",
    "train.bf16_frozen_base": "LoRA/DoRA 在 bf16 自动混合精度下：冻结的基座权重保存为 bf16（适配器仍为 fp32）。",
    "train.fp32_adapter_output": "LoRA/DoRA 在自动混合精度下：被适配层的输出保持 fp32，避免 bf16 把微小的适配器更新舍入掉（精度选项，会慢一些）。",
    "train.packed_attention": "打包时按样例分别计算注意力，而不是整行的块对角掩码（sdpa）。",
    "train.sparse_logits": "只在参与训练的位置计算 logits 和损失（提示词不经过 lm_head）。",
    "train.fast_dropout": "CPU：LoRA dropout 用更快的随机掩码（分布相同）。",
    "train.fused_lora": "LoRA 不用自动混合精度（fp32）时：用一次 addmm 把适配器的输出加到冻结层的输出上。",
    "train.deepspeed": "DeepSpeed JSON 配置文件路径。",
    "train.fsdp": "传给 transformers 的 FSDP 选项，如 'full_shard auto_wrap'。",
    "train.max_memory_gb": "估算内存超过该值时提前报错。",
}


def text(key: str, lang: str = "en", **values: Any) -> str:
    """The text of `key` in `lang` (English when a translation is missing), with {name} values filled in."""
    en, zh = TEXTS.get(key, (key, key))
    chosen = zh if lang == "zh" and zh else en
    return chosen.format(**values) if values else chosen


def field_info(dotted: str, description: str, lang: str) -> str:
    return FIELD_ZH.get(dotted, description) if lang == "zh" else description


class Localizer:
    """Creates components with texts in the starting language and relabels all of them on a language change."""

    def __init__(self, lang: str = "en"):
        self.lang = lang if lang in LANGUAGES else "en"
        self._entries: list[tuple[Any, Callable[[str], dict]]] = []

    def t(self, key: str, **values: Any) -> str:
        return text(key, self.lang, **values)

    def add(self, component: Any, texts: Callable[[str], dict]) -> Any:
        """Register `component`; `texts(lang)` returns the properties (label, info, value) to set in `lang`."""
        self._entries.append((component, texts))
        return component

    def make(self, factory: Callable[..., Any], key: str, info: str | None = None, prop: str = "label",
             **kwargs: Any) -> Any:
        """`factory(label=text(key), info=text(info), **kwargs)`, registered for relabelling."""

        def texts(lang: str) -> dict:
            out = {prop: text(key, lang)}
            if info is not None:
                out["info"] = text(info, lang)
            return out

        return self.add(factory(**texts(self.lang), **kwargs), texts)

    @property
    def components(self) -> list[Any]:
        return [c for c, _ in self._entries]

    def updates(self, lang: str) -> list[Any]:
        """One gr.update per registered component, in registration order (the outputs of the switch event)."""
        import gradio as gr

        return [gr.update(**texts(lang)) for _, texts in self._entries]
