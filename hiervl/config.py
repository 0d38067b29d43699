"""HierVL's config keys: ``add_hiervl_config(cfg)`` adds every key this project reads.

Keys are grouped by the component that reads them. Defaults are the paper's
ViT-B/16 model (``configs/Base-HierVL.yaml`` restates the important ones);
dataset recipes live in the dataset base configs. ``tests/test_config.py`` fails
when a key added here is read nowhere in the code.
"""

try:
    from detectron2.config import CfgNode as CN
except ImportError:  # plain-torch use: benchmarks/gpu_suite.py reads the defaults without it

    class CN(dict):
        """Attribute-access dict standing in for detectron2's CfgNode (defaults only)."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

        def __setattr__(self, name, value):
            self[name] = value


# CLIP's image normalisation (open_clip OPENAI_DATASET_MEAN/STD) in 0..255 units.
CLIP_PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]
CLIP_PIXEL_STD = [68.5005327, 66.6321579, 70.32316305]


def add_hiervl_config(cfg: CN) -> CN:
    """Add HierVL's keys (with defaults) to a detectron2 config, in place; returns ``cfg``."""
    cfg.MODEL.META_ARCHITECTURE = "HierVL"
    cfg.MODEL.PIXEL_MEAN = list(CLIP_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(CLIP_PIXEL_STD)
    cfg.MODEL.HIERVL = CN()
    _add_clip(cfg.MODEL.HIERVL)
    _add_model(cfg.MODEL.HIERVL)
    _add_losses(cfg.MODEL.HIERVL)
    _add_semi_supervised(cfg.MODEL.HIERVL)
    _add_input(cfg.INPUT)
    _add_datasets(cfg.DATASETS)
    _add_solver(cfg.SOLVER)
    _add_test(cfg.TEST)
    return cfg


def _add_clip(h: CN) -> None:
    # --- CLIP towers (hiervl/modeling/backbone/clip.py) ---
    h.CLIP = CN()
    # open_clip architecture name, or "custom" to build from CLIP.CUSTOM below.
    h.CLIP.MODEL_NAME = "ViT-B-16"
    # open_clip pretrained tag (e.g. "openai") or a path to a local checkpoint.
    # "" = random init; allowed only when set explicitly (tests, tiny configs).
    h.CLIP.PRETRAINED = "openai"
    # 1-based ViT blocks whose token maps feed res2..res5 (simple feature pyramid).
    h.CLIP.OUT_INDICES = [3, 6, 9, 12]
    # Channels of res2..res5 after the simple feature pyramid.
    h.CLIP.PYRAMID_CHANNELS = [256, 256, 256, 256]
    # CoOp prompt: number of learnable context tokens replacing the template words.
    h.CLIP.PROMPT_LENGTH = 8
    # Frozen template for t^CLIP (anchor of L_prompt, targets of L_pt / L_qt / MaskCLIP).
    h.CLIP.TEMPLATE = "a photo of a {}."
    # Tiny/custom tower sizes, used when MODEL_NAME == "custom" (tests, quickstart).
    h.CLIP.CUSTOM = CN()
    h.CLIP.CUSTOM.EMBED_DIM = 64
    h.CLIP.CUSTOM.IMAGE_SIZE = 64
    h.CLIP.CUSTOM.PATCH_SIZE = 16
    h.CLIP.CUSTOM.VISION_WIDTH = 64
    h.CLIP.CUSTOM.VISION_LAYERS = 4
    h.CLIP.CUSTOM.VISION_HEADS = 4
    h.CLIP.CUSTOM.TEXT_WIDTH = 64
    h.CLIP.CUSTOM.TEXT_LAYERS = 2
    h.CLIP.CUSTOM.TEXT_HEADS = 4
    h.CLIP.CUSTOM.CONTEXT_LENGTH = 32


def _add_model(h: CN) -> None:
    # --- HSQG: hierarchical semantic query generator (hiervl/modeling/hsqg.py) ---
    h.HSQG = CN()
    # False = ablation "static text queries": all classes active, no gating.
    h.HSQG.ENABLED = True
    # Hierarchy levels L: 3 (one per pixel-decoder feature level) or 1 (no hierarchy).
    h.HSQG.NUM_LEVELS = 3
    h.HSQG.RELEVANCE_THRESHOLD = 0.5
    # Never fewer active classes than this (top-scoring ones are kept).
    h.HSQG.MIN_ACTIVE = 1
    # Gate s_k = sigmoid(w * cos(v, t_k) + b); CLIP cosines sit around 0.2-0.3, so
    # w=10, b=-2.5 starts the gate near 0.5 for typical image/class similarities.
    h.HSQG.INIT_SCALE = 10.0
    h.HSQG.INIT_BIAS = -2.5
    # Gate of labelled images: "ground_truth" (the paper: 1 on ground-truth classes, 0 on
    # the others, so text queries never see an absent class) or "union" (our option: the
    # predicted active set is kept too, and its false positives are supervised as
    # "no object", as they must answer at inference).
    h.HSQG.LABELED_GATE = "ground_truth"

    # --- Pixel decoder with CMSAM (hiervl/modeling/pixel_decoder.py, cmsam.py) ---
    h.PIXEL_DECODER = CN()
    h.PIXEL_DECODER.CONV_DIM = 256
    h.PIXEL_DECODER.MASK_DIM = 256
    h.PIXEL_DECODER.NUM_ENCODER_LAYERS = 6
    h.PIXEL_DECODER.NUM_HEADS = 8
    h.PIXEL_DECODER.NUM_POINTS = 4
    h.PIXEL_DECODER.FFN_DIM = 1024
    h.PIXEL_DECODER.DROPOUT = 0.0
    # Deformable-attention levels (coarse features are listed last).
    h.PIXEL_DECODER.IN_FEATURES = ["res3", "res4", "res5"]
    h.PIXEL_DECODER.COMMON_STRIDE = 4
    # Hide padded pixels (crops of images smaller than the crop, batch padding) from the
    # deformable attention and CMSAM; False = Mask2Former's behaviour (attend to them).
    h.PIXEL_DECODER.MASK_PADDING = True
    h.CMSAM = CN()
    # False = ablation "CMSAM off": text queries skip pixel alignment.
    h.CMSAM.ENABLED = True
    h.CMSAM.NUM_HEADS = 8
    h.CMSAM.FFN_DIM = 1024
    h.CMSAM.DROPOUT = 0.0

    # --- Dual-query transformer decoder (hiervl/modeling/dual_query_decoder.py) ---
    h.DECODER = CN()
    h.DECODER.HIDDEN_DIM = 256
    h.DECODER.NUM_HEADS = 8
    h.DECODER.FFN_DIM = 2048
    h.DECODER.NUM_LAYERS = 9
    h.DECODER.PRE_NORM = False
    # Learnable visual queries M; 0 = ablation "Q_vis off" (text queries only).
    h.DECODER.NUM_VISUAL_QUERIES = 100
    # False = visual queries only: the Mask2Former-style query set (with HSQG and CMSAM
    # off, the "Mask2Former-equivalent" of benchmarks/bench_model.py).
    h.DECODER.TEXT_QUERIES = True
    h.DECODER.DROPOUT = 0.0

    # --- Dynamic mask head (hiervl/modeling/mask_head.py) ---
    h.MASK_HEAD = CN()
    # Layers of the shared MLP that turns a query into its mask kernel theta_i.
    h.MASK_HEAD.KERNEL_MLP_LAYERS = 3
    # Initial temperature of the text-embedding classifier (logits = scale * cos).
    h.MASK_HEAD.LOGIT_SCALE_INIT = 50.0

    # --- Activation checkpointing (memory for compute; gradients are unchanged) ---
    # Recompute a part's activations in the backward instead of keeping them: the ViT
    # blocks of E_I^θ, the deformable encoder layers (+ their CMSAM), the decoder layers.
    # benchmarks/RESULTS.md ("Activation checkpointing") gives what each saves and costs.
    h.CHECKPOINTING = CN()
    h.CHECKPOINTING.IMAGE_ENCODER = False
    h.CHECKPOINTING.PIXEL_DECODER = False
    h.CHECKPOINTING.DECODER = False


def _add_losses(h: CN) -> None:
    # --- Supervised criterion (hiervl/modeling/criterion.py, matcher.py) ---
    h.LOSS = CN()
    h.LOSS.CLASS_WEIGHT = 2.0
    h.LOSS.MASK_WEIGHT = 5.0
    h.LOSS.DICE_WEIGHT = 5.0
    h.LOSS.NO_OBJECT_WEIGHT = 0.1
    h.LOSS.DEEP_SUPERVISION = True
    h.LOSS.TRAIN_NUM_POINTS = 12544
    h.LOSS.OVERSAMPLE_RATIO = 3.0
    h.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75
    # L_rel: BCE of the HSQG gate against class presence on labelled images.
    h.LOSS.REL_WEIGHT = 1.0
    # L_qt: ||Phi(q_i) - t_kappa_i||^2 over matched queries (lambda_align).
    h.LOSS.QT_WEIGHT = 0.05


def _add_semi_supervised(h: CN) -> None:
    # --- Semi-supervised losses (hiervl/modeling/ssl_losses.py) ---
    h.SSL = CN()
    # False = supervised-only training (the labelled stream alone).
    h.SSL.ENABLED = True
    # Weak-to-strong consistency (UniMatch/SemiVL).
    h.SSL.CONSISTENCY_WEIGHT = 1.0
    h.SSL.CONF_THRESHOLD = 0.95
    # "pixel": CE on confident pixels / all valid pixels; "pixelavg": confidence-weighted
    # (Cityscapes).
    h.SSL.CONSISTENCY_MODE = "pixel"
    # Warn when no pseudo-label passed CONF_THRESHOLD for this many iterations in a row
    # (loss_unsup_s1/s2/fp exactly 0: the unlabelled images do not contribute);
    # 0 = a tenth of SOLVER.MAX_ITER. "pixel" mode only (hiervl/engine/hooks.py).
    h.SSL.SILENT_WARNING_ITERS = 0
    # Dropout2d rate of the feature-perturbed weak view (L_fp).
    h.SSL.FP_DROPOUT = 0.5
    # Entropy minimisation on the strong views' P: off by default. It is in neither the
    # paper, SemiVL nor UniMatch, and unlike the consistency loss it acts on every pixel
    # from the first iteration, confident or not, pushing P towards its current argmax (the
    # majority class of a barely trained model); see benchmarks/RESULTS.md, real photos.
    h.SSL.ENTROPY_ENABLED = False
    h.SSL.ENTROPY_WEIGHT = 0.01
    # MaskCLIP dense guidance from the frozen image encoder; weight decays
    # linearly from MASKCLIP_WEIGHT to 0 over training.
    h.SSL.MASKCLIP_ENABLED = True
    h.SSL.MASKCLIP_WEIGHT = 0.1
    h.SSL.MASKCLIP_CERTAINTY = 0.9
    h.SSL.MASKCLIP_LOGIT_SCALE = 100.0

    # --- Vision-language regularisers (hiervl/modeling/vl_losses.py) ---
    h.VL = CN()
    h.VL.PROMPT_ENABLED = True
    h.VL.PROMPT_WEIGHT = 0.05
    # lambda of L_anchor's repulsion term.
    h.VL.ANCHOR_LAMBDA = 0.1
    # L_anchor's repulsion over the other classes j != k: "mean" (our default; the
    # paper's eq. 4 sums, which outweighs the anchor at K >= 81, see vl_losses.anchor_loss)
    # or "sum" (eq. 4 as written).
    h.VL.ANCHOR_REPULSION = "mean"
    h.VL.MASK_ENABLED = True
    h.VL.MASK_WEIGHT = 0.5
    # Also blank pseudo-labelled classes of unlabelled images for L_mask / L_pt.
    h.VL.MASK_ON_UNLABELED = False
    h.VL.PT_ENABLED = True
    h.VL.PT_WEIGHT = 0.10
    h.VL.PT_TEMPERATURE = 0.07


def _add_input(i: CN) -> None:
    # --- Data augmentation (hiervl/data/mappers.py) ---
    # CLIP's pixel statistics are RGB.
    i.FORMAT = "RGB"
    # Random rescale of the labelled/unlabelled image (ratio of its own size).
    i.SCALE_RANGE = [0.5, 2.0]
    i.CROP.ENABLED = True
    i.CROP.TYPE = "absolute"
    i.CROP.SIZE = (512, 512)
    i.FLIP_PROB = 0.5
    # Strong views of unlabelled images.
    i.STRONG = CN()
    i.STRONG.COLOR_JITTER_PROB = 0.8
    i.STRONG.COLOR_JITTER = [0.5, 0.5, 0.5, 0.25]  # brightness, contrast, saturation, hue
    i.STRONG.GRAYSCALE_PROB = 0.2
    i.STRONG.BLUR_PROB = 0.5
    i.STRONG.BLUR_SIGMA = [0.1, 2.0]
    i.STRONG.CUTMIX_PROB = 0.5
    i.STRONG.CUTMIX_AREA = [0.02, 0.4]
    i.STRONG.CUTMIX_RATIO = [0.3, 3.3]


def _add_datasets(d: CN) -> None:
    # --- Two-stream training data (hiervl/data/loader.py) ---
    d.TRAIN_LABELED = ()
    d.TRAIN_UNLABELED = ()
    # Custom folder dataset registered from the config (hiervl/data/datasets/custom.py).
    d.CUSTOM = CN()
    d.CUSTOM.NAME = ""
    d.CUSTOM.ROOT = ""
    # "parts": a folder per part (LABELED, UNLABELED, VAL below; unlabelled images need no
    # masks). "single_folder": all images in IMAGE_DIR, masks in MASK_DIR, the parts from
    # split files or fractions (benchmark replication).
    d.CUSTOM.LAYOUT = "parts"
    # Folders of the "parts" layout, relative to ROOT or absolute; nested sub-folders are
    # scanned. VAL is optional: without its folder there is no periodic evaluation.
    d.CUSTOM.LABELED = CN()
    d.CUSTOM.LABELED.IMAGES = "labeled/images"
    d.CUSTOM.LABELED.MASKS = "labeled/masks"
    d.CUSTOM.UNLABELED = CN()
    d.CUSTOM.UNLABELED.IMAGES = "unlabeled/images"
    d.CUSTOM.VAL = CN()
    d.CUSTOM.VAL.IMAGES = "val/images"
    d.CUSTOM.VAL.MASKS = "val/masks"
    # Folders of the "single_folder" layout (masks mirror the image tree).
    d.CUSTOM.IMAGE_DIR = "images"
    d.CUSTOM.MASK_DIR = "masks"
    # Class names: a list, or a path to a txt file with one name per line.
    d.CUSTOM.CLASSES = []
    d.CUSTOM.CLASSES_FILE = ""
    # single_folder: optional split files (one image per line: an id such as train/0001, a
    # file name, or "image_path [label_path]" relative to ROOT); else the fractions.
    d.CUSTOM.LABELED_SPLIT = ""
    d.CUSTOM.VAL_SPLIT = ""
    d.CUSTOM.LABELED_FRACTION = 0.1
    d.CUSTOM.VAL_FRACTION = 0.1
    d.CUSTOM.SEED = 0


def _add_solver(s: CN) -> None:
    # --- Optimisation (hiervl/engine/) ---
    s.OPTIMIZER = "ADAMW"
    s.IMS_PER_BATCH_LABELED = 8
    s.IMS_PER_BATCH_UNLABELED = 8
    s.BACKBONE_MULTIPLIER = 0.1
    # HSQG, CMSAM, DQTD and the prompt learn at HEAD_MULTIPLIER x BASE_LR.
    s.HEAD_MULTIPLIER = 4.0
    s.LR_SCHEDULER_NAME = "WarmupPolyLR"
    s.POLY_LR_POWER = 0.9
    # Weight decay of embeddings (Mask2Former's WEIGHT_DECAY_EMBED): nn.Embedding tables,
    # position/level embeddings, the CLS token, the prompt context vectors, the
    # classifier's void vector, and the learned scalars (HSQG gate w, b; classifier
    # log-scale). WEIGHT_DECAY applies to weights, WEIGHT_DECAY_NORM (detectron2's key) to
    # normalisation layers; setting all three equal gives one uniform decay.
    s.WEIGHT_DECAY_EMBED = 0.0
    # Mixed precision (SOLVER.AMP.ENABLED): "bfloat16" (CPU or GPU) or "float16" (GPU,
    # with a gradient scaler). The MSDeformAttn op always computes in float32.
    s.AMP.PRECISION = "bfloat16"
    # What to do when a prediction or a loss term is NaN/Inf: "stop" (raise, naming it and
    # the iteration) or "skip" the iteration (weights, optimizer and LR schedule unchanged).
    s.NONFINITE_ACTION = "stop"
    # Gradient accumulation: split each iteration's labelled and unlabelled batches into
    # this many equal micro-batches, one forward/backward each, one optimizer step. The
    # per-image terms give the full batch's gradient; terms normalised over the batch
    # (mask counts, confident pixels) are normalised per micro-batch, as per GPU in DDP.
    s.MICRO_BATCHES = 1
    # With "skip": at most this many iterations in a row are skipped; the next non-finite
    # one stops training (diverged weights do not recover by skipping).
    s.NONFINITE_MAX_SKIPS = 10


def _add_test(t: CN) -> None:
    # --- Inference (hiervl/evaluation/sliding_window.py, meta_arch.py) ---
    t.SLIDING_WINDOW = CN()
    t.SLIDING_WINDOW.ENABLED = True
    t.SLIDING_WINDOW.CROP_SIZE = 512
    # Stride between windows; 0 = half the crop (50% overlap).
    t.SLIDING_WINDOW.STRIDE = 0
    # Drop the classes HSQG pruned for an image (or window) from its final scores. The
    # visual queries can vote for any class, so without this a pruned class can still win
    # a pixel. No effect with HSQG.ENABLED False (every class is active).
    t.PRUNE_CLASSES = False
    # Open vocabulary: replace the dataset's class names at inference ([] = keep).
    t.VOCABULARY = []
