"""Every setting, as frozen dataclasses, loaded from YAML with unknown keys refused.

The defaults here *are* the embedded default configuration; ``configs/default.yaml``
spells out the same values (a test keeps the two equal).  A site's file only needs the
keys it changes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class SelectionConfig:
    """Rules that pick the series to analyse (all data, no code)."""

    sop_classes: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.2",)  # CT Image Storage
    modalities: tuple[str, ...] = ("CT",)
    required_image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    excluded_image_type: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM")
    max_slice_thickness_mm: float = 1.5
    axial_tolerance_deg: float = 15.0
    min_slices: int = 40
    min_coverage_mm: float = 150.0
    # BodyPartExamined values that mean "not a chest"; an empty or unlisted value passes
    # and the lung stage decides (it refuses a series without lungs).
    non_chest_body_parts: tuple[str, ...] = (
        "HEAD",
        "BRAIN",
        "SKULL",
        "NECK",
        "ABDOMEN",
        "PELVIS",
        "HIP",
        "KNEE",
        "LEG",
        "ANKLE",
        "FOOT",
        "ARM",
        "ELBOW",
        "HAND",
        "WRIST",
        "SHOULDER",
        "EXTREMITY",
        "CSPINE",
        "LSPINE",
        "HEART",
    )
    # Regular expressions matched against ConvolutionKernel; a series whose kernel matches
    # an earlier pattern is preferred (lung / sharp kernels first).
    preferred_kernels: tuple[str, ...] = (
        r"(?i)lung",
        r"^(?i:B[l]?[6-8]\d|Br[5-9]\d|Bl\d\d|I[57]0)",
        r"^(?i:FC5\d|FC8\d)",
        r"^(?i:YA|YB|YC|L|LUNG)$",
        r"^(?i:D|E|C)$",
    )


@dataclass(frozen=True)
class VolumeConfig:
    gap_tolerance_mm: float = 0.1  # a step may exceed the median by max(this, fraction)
    gap_tolerance_fraction: float = 0.05
    max_tilt_deg: float = 0.5  # slice stack vs. slice normal; more is refused (gantry tilt)
    hu_min: int = -1024  # padding outside the reconstruction circle is set to this
    hu_max: int = 3071
    # Processes that decode compressed slices in parallel: 0 = one per CPU core, 1 = none.
    decode_workers: int = 0


@dataclass(frozen=True)
class LungsConfig:
    # "model": the learned segmenter (ONNX Runtime, folder ``model``); "classical": the
    # threshold method below, which also serves as the model's cross-check
    method: str = "model"
    model: str = "models/ctscreen-lungs-unet2d"
    threads: int = 2  # onnxruntime intra-op threads (the model)
    providers: tuple[str, ...] = ()  # onnxruntime providers; empty: CUDA where present, CPU
    # method "model": the classical segmenter runs too, at this coarser in-plane spacing, and
    # a Dice between the two under cross_check_min_dice is a coded warning
    # ("lung-methods-disagree"); cross_check false skips it
    # the model runs on slices about this far apart (its probabilities are interpolated in
    # between): a speed / z-resolution trade-off of serving; 0: the model.yaml value
    z_step_mm: float = 3.0
    cross_check: bool = True
    cross_check_spacing_mm: float = 3.0
    cross_check_min_dice: float = 0.85
    # the learned mask: a 3-D piece less aerated (below air_threshold_hu) than this is not lung
    min_aerated_fraction: float = 0.05
    # ... and a piece smaller than small_piece_ml must be at least this aerated
    small_piece_ml: float = 200.0
    small_piece_min_aerated_fraction: float = 0.5
    # a voxel of the learned mask denser than dense_hu (solid tissue: consolidation, or the
    # liver, muscle, heart next to the lung) is lung only where the model's probability is
    # at least dense_min_probability (0.5: off); what a lung encloses stays lung
    dense_hu: float = -300.0
    dense_min_probability: float = 0.8
    # dense lung (above pleural_min_mean_hu) that the classical cross-check keeps (pleural
    # repair, mirror recovery of a lobar consolidation) and the model does not is added
    dense_from_classical: bool = True
    min_lung_volume_ml: float = 500.0  # less, both lungs together: "no-lungs-found"
    working_spacing_mm: float = 1.5  # in-plane blocks of about this size (labels upsampled)
    air_threshold_hu: float = -400.0  # lung parenchyma and airways are below
    min_component_ml: float = 50.0  # an air component smaller than this is never a lung
    airway_threshold_hu: float = -900.0  # trachea seed; growth tries this and lower
    airway_max_ml: float = 250.0  # a grown airway larger than this has leaked into the lung
    trachea_min_area_mm2: float = 40.0
    trachea_max_area_mm2: float = 900.0
    trachea_max_offset_mm: float = 40.0  # from the body's midline (LPS x)
    # Convex-hull repair of dense pathology against the pleura (per slice, per lung)
    pleural_max_depth_mm: float = 40.0  # deeper hull additions are anatomy (heart, liver)
    pleural_max_area_fraction: float = 0.25  # of the slice's lung area
    pleural_min_mean_hu: float = -500.0  # hull additions must be dense (pathology or wall)
    mediastinal_margin: float = 0.0  # medial by more than this x lung width: mediastinum
    # Mirror recovery of large dense regions (lobar consolidation / collapse), see lungs.py
    mirror_recovery: bool = True
    bone_min_hu: float = 200.0  # bone, for the mid-sagittal symmetry plane
    mirror_max_yaw_deg: float = 10.0  # plane normal searched within this of LPS x
    mirror_deficit_ratio: float = 0.5  # a slice's lung below this x its mirrored twin: deficient
    mirror_extend_ratio: float = 0.8  # ... and the run of slices under this x around it
    dense_max_hu: float = 150.0  # recovered tissue is between air_threshold_hu and this ...
    fat_min_hu: float = -200.0  # ... and not fat (a band that survives an in-plane opening)
    fat_max_hu: float = -30.0
    mirror_min_ml: float = 10.0  # smaller recovered pieces are asymmetry, not pathology
    # QA of the final mask (lung_mask_warnings): implausible results are flagged, not guessed
    qa_min_side_ratio: float = 0.5  # one lung under this x the other: "lung-asymmetry"
    qa_min_total_ml: float = 2000.0  # both lungs together under this: "lung-volume-low"


@dataclass(frozen=True)
class LesionsConfig:
    # "density" (classical baseline), "onnx" (a lesion model, ``model``) or "lung-model" (the
    # infection class of the lung model, ``lungs.model``: one network for lungs and lesions)
    detector: str = "density"
    # detector "onnx": the model folder (model.onnx + model.yaml); a relative path is looked
    # up from the working directory, then from the repository root
    model: str = "models/covid-lesions-unet2d"
    threads: int = 2  # onnxruntime intra-op threads
    # onnxruntime execution providers in order of preference; empty: CUDA where this
    # onnxruntime has it (onnxruntime-gpu), then CPU
    providers: tuple[str, ...] = ()
    batch_slices: int = 16  # axial slices per onnxruntime call
    # in a stack the model runs on slices about this far apart (probabilities interpolated
    # in between; a speed / z-resolution trade-off of serving); 0: the model.yaml value
    z_step_mm: float = 3.0
    # detectors "onnx" and "lung-model": the model says where a lesion is; its kind follows
    # the density there.
    # A lesion voxel whose HU, smoothed in-plane (Gaussian, 1 mm), is above this value is
    # consolidation, else ground glass (chosen on the training and validation slices, see
    # docs); None keeps the model's own kind
    model_consolidation_hu: float | None = -400.0
    max_reported_findings: int = 20  # the largest N are reported one by one
    # Study-level call, the RSNA category (pipeline/lesions.py, rsna_category). Shares are
    # of the involved volume (all findings of both lungs together).
    indeterminate_min_pct: float = 0.1  # less involvement of both lungs (percent): negative
    typical_min_pct: float = 1.0  # typical needs at least this involvement (percent) ...
    bilateral_min_share: float = 0.1  # ... the less involved lung holding this share ...
    peripheral_depth_mm: float = 25.0  # (a voxel this close to the pleura is peripheral)
    peripheral_min_share: float = 0.5  # ... this share peripheral ...
    typical_min_ggo_share: float = 0.25  # ... and this share ground glass
    atypical_min_consolidation_share: float = 0.7  # atypical: consolidation-dominant and ...
    solitary_min_share: float = 0.8  # ... unilateral or one focus holding this share
    # Density detector (HU bands after smoothing; see pipeline/lesions.py)
    working_spacing_mm: float = 1.5  # in-plane blocks of about this size
    smoothing_sigma_mm: float = 1.0
    ggo_min_hu: float = -750.0  # ground glass from here ...
    consolidation_min_hu: float = -300.0  # ... to here; consolidation from here ...
    consolidation_max_hu: float = 100.0  # ... to here; denser is calcification or contrast
    consolidation_edge_hu: float = -450.0  # a consolidation's partial-volume rim joins it
    vessel_opening_mm: float = 3.5  # cube half-side a: removes tubes of radius < a*sqrt(2)
    regrow_voxels: int = 1  # lesions grow back this many voxels after the opening
    ggo_shell_opening_mm: float = 1.5  # removes thin GGO shells around consolidation
    edge_erosion_mm: float = 3.0  # lesions must reach this deep into the lung
    min_lesion_ml: float = 0.3


@dataclass(frozen=True)
class ReportConfig:
    key_images: int = 3
    window_center: float = -600.0
    window_width: float = 1500.0
    manufacturer: str = "ctscreen project"
    institution_name: str = ""


@dataclass(frozen=True)
class WorklistConfig:
    # SQLite file; empty means "<archive>.ctscreen.sqlite" beside the archive folder.
    path: str = ""


ARCHIVE_KINDS = ("dimse", "dicomweb", "folder")
RETRIEVE_METHODS = ("c-get", "c-move")
DELETE_METHODS = ("", "orthanc-rest")


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards an archive (DIMSE over TLS, or HTTPS).  Paths to PEM files."""

    enabled: bool = False
    ca_file: str = ""  # trust these CAs (empty: the system's)
    cert_file: str = ""  # our client certificate, where the archive asks for one
    key_file: str = ""
    server_hostname: str = ""  # name to check in the archive's certificate (default: host)


@dataclass(frozen=True)
class ArchiveConfig:
    """One named archive under ``archives:``.  Credentials never live in the file: the
    config names the environment variable that holds them (``password_env``)."""

    kind: str = "dimse"  # dimse | dicomweb | folder
    # DIMSE
    host: str = ""
    port: int = 104
    called_ae: str = ""  # the archive's AE title
    calling_ae: str = "CTSCREEN"  # ours, as registered in the archive
    retrieve: str = "c-get"  # c-get | c-move
    move_destination: str = ""  # C-MOVE: our AE title as the archive knows it (default calling_ae)
    move_port: int = 0  # C-MOVE: the port our temporary storage SCP listens on
    # DICOMweb
    url: str = ""  # base URL of the DICOMweb service (QIDO, WADO and STOW under it)
    username: str = ""
    password_env: str = ""  # name of the environment variable that holds the password
    token_env: str = ""  # name of the environment variable that holds a bearer token
    # folder
    path: str = ""
    # Removing superseded results (dimse and dicomweb): "" keeps them (DICOM has no
    # standard delete; the replacing SR names them as its predecessors); "orthanc-rest"
    # deletes them through Orthanc's REST API at rest_url (username / password_env as above)
    delete: str = ""
    rest_url: str = ""
    # all kinds
    tls: TlsConfig = field(default_factory=TlsConfig)
    timeout_s: float = 30.0  # connect / response timeout
    # Attempts to retrieve a series when the archive delivers fewer instances than it
    # announced; after these the study is "not analysed: incomplete-retrieval:N/M" and is
    # retried on the next run.
    retrieve_attempts: int = 2


SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


@dataclass(frozen=True)
class SiteConfig:
    """One hospital that a regional centre screens for (``sites:``; docs/sites.md).

    A study is known by its site and its StudyInstanceUID: two hospitals holding copies of
    one study each get it screened and delivered once, to themselves."""

    # names under archives: where the site's studies are found, in order (a study in two of
    # them is screened once, from the first)
    archives: tuple[str, ...] = ()
    # where results go (a name under archives:); empty: back to the archive each study came from
    results_archive: str = ""
    # the site's clock: StudyDate / StudyTime are its local time (an IANA name such as
    # "Asia/Shanghai"); empty: this machine's
    timezone: str = ""
    # ``ctscreen nightly``: the studies of the last this many hours of the site's clock
    window_hours: float = 24.0
    # ``ctscreen nightly``: studies taken from this site per turn of the round-robin
    weight: int = 1
    # selection rules of this site's scanners: the keys given here replace those of the
    # top-level selection: section (the rest stay as they are there)
    selection: SelectionConfig | None = None


@dataclass(frozen=True)
class ListenTlsConfig:
    """DIMSE over TLS for ``ctscreen listen``: our certificate, and the CA that the sending
    nodes' certificates must be signed by (paths to PEM files)."""

    enabled: bool = False
    cert_file: str = ""  # our certificate (chain), PEM
    key_file: str = ""  # its private key (default: inside cert_file)
    ca_file: str = ""  # the CA(s) a sender's certificate is checked against
    require_client_cert: bool = True  # a sender without a certificate that verifies: refused


@dataclass(frozen=True)
class ListenConfig:
    """``ctscreen listen``: a C-STORE SCP that screens each study once it is complete."""

    ae_title: str = "CTSCREEN"
    bind_address: str = "127.0.0.1"  # 0.0.0.0 to accept from the network
    port: int = 11112
    allowed_calling_aes: tuple[str, ...] = ()  # empty refuses every association
    spool: str = ""  # where received instances are written; empty: ./ctscreen-spool
    stability_timeout_s: float = 30.0  # a study is complete when nothing arrived for this long
    results_archive: str = ""  # name under archives: where results go; empty: the spool folder
    delete_after_screening: bool = True  # drop received files of a screened study
    tls: ListenTlsConfig = field(default_factory=ListenTlsConfig)
    # the site (of sites:) whose studies this node receives; '' : none (a plain site)
    site: str = ""


@dataclass(frozen=True)
class OutboxConfig:
    """Results waiting for delivery.  Empty path: ``<worklist>.outbox`` beside the worklist."""

    path: str = ""
    backoff_initial_s: float = 60.0
    backoff_max_s: float = 3600.0


@dataclass(frozen=True)
class BatchConfig:
    """The nightly run: parallelism, the per-study state, and limits per study.

    A study over a limit is "not analysed: limit-exceeded:<which>" and the batch goes on;
    it is tried again only when the limits change.  0 means "no limit" for each limit.
    """

    workers: int = 1  # processes that screen studies (models loaded once in each)
    # Per-study state (see pipeline/state.py): empty = the worklist's SQLite file;
    # "postgresql://user@host/db" (password from $PGPASSWORD) for a shared state.
    state_url: str = ""
    lease_s: float = 300.0  # a claimed study is taken over if its holder is silent this long
    max_study_seconds: float = 1800.0  # wall time of one study's analysis
    max_study_memory_mb: int = 6000  # memory one study may add to its worker
    max_slices: int = 2000  # instances in the chosen series
    max_series_bytes: int = 4 * 1024**3  # decoded pixel bytes of the chosen series
    disk_reserve_mb: int = 1024  # below this free space (state, outbox, results), pull nothing
    # ``ctscreen nightly``: a site whose archive does not answer is tried again this often ...
    site_retry_s: float = 300.0
    # ... until this long after the night's start; its studies then wait for the next night
    site_give_up_s: float = 14400.0


@dataclass(frozen=True)
class WebConfig:
    """``ctscreen serve``: the radiologists' worklist in the browser (see docs/web.md)."""

    # the per-study view store (downsampled slices, labels, key images) written at screening
    # time; empty: "<worklist db stem>.views" beside the worklist
    view_store: str = ""
    view_max_px: int = 256  # stored slices are downsampled to at most this many pixels a side
    store_views: bool = True  # false: the batch stores no views (study pages show no images)
    # views older than this are removed when a batch starts (about 11 MB a study at 256 px);
    # 0 keeps them all
    view_keep_days: float = 30.0
    # users, sessions, reviews and the audit log (SQLite); empty: "<worklist db stem>.web.sqlite"
    # beside the worklist
    db: str = ""
    bind_address: str = "127.0.0.1"  # loopback; 0.0.0.0 to serve the network (put TLS in front)
    port: int = 8080
    session_idle_min: float = 30.0  # a session unused this long is over
    session_max_hours: float = 12.0  # ... and any session ends this long after the login
    login_max_failures: int = 5  # failed logins of one user name (or one client) within ...
    login_window_s: float = 900.0  # ... this many seconds refuse further attempts until it passes
    # a link on the study page to the site's viewer; {study_uid} and {accession} are filled in,
    # e.g. "http://localhost:8042/ohif/viewer?StudyInstanceUIDs={study_uid}"; empty hides it
    viewer_url_template: str = ""
    # mark the session cookie Secure (sent over HTTPS only): set true behind TLS
    cookie_secure: bool = False
    page_size: int = 50  # worklist rows per page
    list_refresh_s: int = 60  # the list page polls for changes this often (0: never)
    # drift: a week whose sensitivity / specificity / positive predictive value against the
    # reviews falls below these is marked on the metrics page
    min_sensitivity: float = 0.8
    min_specificity: float = 0.6
    min_ppv: float = 0.5
    # the study-level calls (categories) that count as a positive screen
    positive_categories: tuple[str, ...] = ("typical", "indeterminate")


@dataclass(frozen=True)
class Config:
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    lungs: LungsConfig = field(default_factory=LungsConfig)
    lesions: LesionsConfig = field(default_factory=LesionsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    worklist: WorklistConfig = field(default_factory=WorklistConfig)
    archives: dict[str, ArchiveConfig] = field(default_factory=dict)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    listen: ListenConfig = field(default_factory=ListenConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    web: WebConfig = field(default_factory=WebConfig)

    def archive(self, name: str) -> ArchiveConfig:
        """The archive configured under ``name``, or a ConfigError naming the known ones."""
        try:
            return self.archives[name]
        except KeyError:
            known = ", ".join(sorted(self.archives)) or "none"
            raise ConfigError(
                f"expected an archive named in the config's archives: section ({known}), "
                f"got {name!r}"
            ) from None

    def site(self, name: str) -> SiteConfig:
        """The site configured under ``name``, or a ConfigError naming the known ones."""
        try:
            return self.sites[name]
        except KeyError:
            known = ", ".join(sorted(self.sites)) or "none"
            raise ConfigError(
                f"expected a site named in the config's sites: section ({known}), got {name!r}"
            ) from None

    def site_of(self, archive: str) -> str:
        """The site whose archives: list names ``archive`` ('' where none does)."""
        for name, site in self.sites.items():
            if archive in site.archives:
                return name
        return ""

    def for_site(self, name: str) -> Config:
        """This configuration as the site ``name`` sees it (its selection rules); itself for
        the empty name."""
        if not name:
            return self
        site = self.site(name)
        return self if site.selection is None else dataclasses.replace(
            self, selection=site.selection)

    def analysis_key(self) -> str:
        """What the screening result depends on (for fingerprints): not where archives are,
        nor how the work is spread (threads, processes, providers)."""
        volume = dataclasses.replace(self.volume, decode_workers=0)
        lesions = dataclasses.replace(self.lesions, threads=0, providers=(), batch_slices=0)
        lungs = dataclasses.replace(self.lungs, threads=0, providers=())
        return repr((self.selection, volume, lungs, lesions, self.report))


@dataclass(frozen=True)
class TrainConfig:
    """Training of the 2D lesion model (``configs/train_lesions.yaml``); see pipeline/train."""

    dataset: str = "work/lesions-dataset"  # made by `ctscreen data import`
    out: str = "work/train-lesions"  # checkpoints, splits.json, log
    name: str = "covid-lesions-unet2d"
    version: str = "1.0.0"
    seed: int = 0
    # case-level split of the cases without a fixed split, per site (stratified)
    val_fraction: float = 0.12
    test_fraction: float = 0.25
    # preprocessing, written into model.yaml so inference reads the same values
    # "hu-window": clip to hu_window and scale; "ma20": the recipe of
    # pipeline/representation.py on the lung crop (spacing_mm and hu_window then unused)
    input: str = "hu-window"
    z_step_mm: float = 0.0  # in a stack the model runs on slices this far apart (0: all)
    spacing_mm: float = 1.5  # in-plane pixel size the model sees
    hu_window: tuple[float, float] = (-1100.0, 300.0)  # clipped, then scaled to 0..1
    margin_mm: float = 10.0  # around the lungs' bounding box at inference
    min_lesion_mm2: float = 20.0  # smaller predicted pieces (per slice) are dropped
    min_lesion_ml: float = 0.3  # ... and in a stack of slices, smaller lesions (as density)
    # network: MONAI BasicUNet (2D), 3 classes
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    # optimisation
    patch: int = 128
    batch_size: int = 16
    epochs: int = 30
    iterations_per_epoch: int = 50
    learning_rate: float = 0.002
    weight_decay: float = 0.0001
    positive_fraction: float = 0.6  # patches centred on a lesion pixel
    annotated_2d_fraction: float = 0.5  # share of patches from annotated 2D slices
    ma20_fraction: float = 0.0  # share of patches from ma20 slices (merged infection labels)
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # cross-entropy weight per class
    union_dice: bool = False  # add the Dice of lesions as a whole (labels of unknown kind)
    negative_slices_per_volume: int = 40  # lesion-free slices kept per volume case
    device: str = "auto"  # "auto" (cuda if present), "cpu" or "cuda"
    # CPU threads for torch; 0: all cores but one.  On a 2-core machine shared with other
    # jobs, 2 threads ran 5-8x slower than 1 (OpenMP threads waiting on a busy core).
    threads: int = 0


@dataclass(frozen=True)
class LungTrainConfig:
    """Training of the 2D lung model (``configs/train_lungs.yaml``); see pipeline/train/lungs.py."""

    ma20: str = "../shared/data/covid-lesions/ma20-lungs-infection"
    # real HU series whose slices without lung (per the classical segmenter) are negatives
    negatives_from: tuple[str, ...] = ("../shared/data/chest-ct/lidc-idri-0314",)
    out: str = "work/train-lungs"
    name: str = "ctscreen-lungs-unet2d"
    version: str = "1.1.0"
    # the split of the ma20 patients (split_groups) is drawn by this seed; the lesion
    # dataset's ma20 cases keep the same split (data import --ma20)
    seed: int = 1
    test_groups: int = 2  # coronacases volumes held out for testing
    val_groups: int = 1  # ... and for validation
    size: int = 128  # the network's in-plane grid (the 256 recipe image, area-averaged)
    z_step_mm: float = 2.5  # inference: the model runs on slices about this far apart
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    batch_size: int = 16
    epochs: int = 14
    iterations_per_epoch: int = 100
    learning_rate: float = 0.003
    weight_decay: float = 0.0001
    negative_fraction: float = 0.12  # share of samples drawn from the negatives
    infection_weight: float = 6.0  # infected lung pixels weigh 1 + this in the cross-entropy
    dense_fraction: float = 0.5  # share of ma20 samples given synthetic dense lung
    # background within boundary_px network pixels of the lung (the chest wall, the liver dome,
    # the paravertebral muscle: where a model that keeps dense lung over-reaches) weighs
    # 1 + boundary_weight
    boundary_weight: float = 0.0
    boundary_px: int = 6
    # a third class, infected lung (the ma20 infection masks; synthetic dense lung counts as
    # infected): one network gives the lung region and the lesions (issue 11)
    infection: bool = False
    # a model folder whose ONNX weights start the training (the lung model: same network; its
    # lung row of the last layer also starts the infection row)
    init_from: str | None = None
    # annotated lesion slices (the semiseg layout: lung-cropped, GGO / consolidation) made into
    # the recipe as they are; they teach the infection class only (their lung is not
    # annotated).  Only the cases the model folder ``lesion_slices_of`` lists as seen in its
    # training or validation are used, so that its held-out slices stay held out
    lesion_slices: str | None = None
    lesion_slices_of: str | None = None
    lesion_fraction: float = 0.2  # share of samples drawn from them
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0: all cores


def load_lung_train_config(path: str | Path | None = None) -> LungTrainConfig:
    """The lung model's training defaults, overridden by the YAML file at ``path``."""
    return _load_dataclass(LungTrainConfig, path)


def load_train_config(path: str | Path | None = None) -> TrainConfig:
    """The embedded training defaults, overridden by the YAML file at ``path`` where given."""
    return _load_dataclass(TrainConfig, path)


def _load_dataclass(cls: type[T], path: str | Path | None) -> T:
    if path is None:
        return cls()
    p = Path(path)
    return from_mapping(cls, _read_yaml(p), where=p.name)


def _read_yaml(p: Path) -> Any:
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from e
    return {} if raw is None else raw


def load_config(path: str | Path | None = None) -> Config:
    """The embedded defaults, overridden by the YAML file at ``path`` where given."""
    if path is None:
        return Config()
    p = Path(path)
    raw = _read_yaml(p)
    if isinstance(raw, dict) and isinstance(raw.get("sites"), dict):
        raw = _merge_site_selection(raw)
    config = from_mapping(Config, raw, where=p.name)
    for name, a in config.archives.items():
        _check_archive(name, a, p.name)
    _check_sites(config, p.name)
    if config.listen.site and config.listen.site not in config.sites:
        raise ConfigError(f"{p.name}: listen.site: expected a site of sites: "
                          f"({', '.join(sorted(config.sites)) or 'none'}), "
                          f"got {config.listen.site!r}")
    t = config.listen.tls
    if t.enabled and (not t.cert_file or (t.require_client_cert and not t.ca_file)):
        raise ConfigError(f"{p.name}: listen.tls: expected cert_file (and ca_file, the CA of "
                          "the senders' certificates, unless require_client_cert is false)")
    return config


def _merge_site_selection(raw: dict[str, Any]) -> dict[str, Any]:
    """A site's ``selection:`` keys laid over the file's top-level ``selection:`` (so that a
    site states only what its scanners need differently)."""
    top = raw.get("selection") or {}
    sites = {}
    for name, site in raw["sites"].items():
        if isinstance(site, dict) and isinstance(site.get("selection"), dict):
            if not isinstance(top, dict):
                raise ConfigError("selection: expected a mapping")
            site = {**site, "selection": {**top, **site["selection"]}}
        sites[name] = site
    return {**raw, "sites": sites}


def _check_sites(config: Config, where: str) -> None:
    import re
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    owner: dict[str, str] = {}
    for name, site in config.sites.items():
        at = f"{where}: sites.{name}"
        if not re.match(SITE_NAME, name):
            raise ConfigError(f"{at}: expected a site name of letters, digits, '.', '_' or "
                              "'-' (at most 64, starting with a letter or digit)")
        if not site.archives:
            raise ConfigError(f"{at}.archives: expected at least one archive name")
        for a in (*site.archives, *([site.results_archive] if site.results_archive else [])):
            if a not in config.archives:
                known = ", ".join(sorted(config.archives)) or "none"
                raise ConfigError(f"{at}: archive {a!r} is not under archives: ({known})")
        for a in site.archives:
            if a in owner and owner[a] != name:
                raise ConfigError(f"{at}: archive {a!r} already belongs to site {owner[a]!r} "
                                  "(an archive serves one site)")
            owner[a] = name
        if site.timezone:
            try:
                ZoneInfo(site.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"{at}.timezone: expected an IANA time zone name such as "
                                  f"Asia/Shanghai, got {site.timezone!r}") from None
        if site.window_hours <= 0:
            raise ConfigError(f"{at}.window_hours: expected a positive number of hours")
        if site.weight < 1:
            raise ConfigError(f"{at}.weight: expected a whole number of at least 1")
    for name, site in config.sites.items():
        if site.results_archive in owner and owner[site.results_archive] != name:
            raise ConfigError(f"{where}: sites.{name}.results_archive "
                              f"{site.results_archive!r} belongs to site "
                              f"{owner[site.results_archive]!r}: results never cross sites")


def _check_archive(name: str, a: ArchiveConfig, where: str) -> None:
    at = f"{where}: archives.{name}"
    if a.kind not in ARCHIVE_KINDS:
        raise ConfigError(f"{at}.kind: expected one of {list(ARCHIVE_KINDS)}, got {a.kind!r}")
    if a.kind == "dimse":
        if not a.host or not a.called_ae:
            raise ConfigError(f"{at}: a dimse archive needs host and called_ae")
        if a.retrieve not in RETRIEVE_METHODS:
            raise ConfigError(
                f"{at}.retrieve: expected one of {list(RETRIEVE_METHODS)}, got {a.retrieve!r}"
            )
        if a.retrieve == "c-move" and not a.move_port:
            raise ConfigError(f"{at}: C-MOVE needs move_port (where our storage SCP listens)")
        for ae in (a.called_ae, a.calling_ae, a.move_destination):
            if len(ae) > 16:
                raise ConfigError(f"{at}: expected AE titles of at most 16 characters, got {ae!r}")
    if a.kind == "dicomweb" and not a.url.startswith(("http://", "https://")):
        raise ConfigError(f"{at}.url: expected an http(s) URL, got {a.url!r}")
    if a.kind == "dicomweb" and a.tls.enabled and not a.url.startswith("https://"):
        raise ConfigError(f"{at}: tls.enabled with a plain http:// URL: expected https:// "
                          "(ctscreen never sends over plain text what TLS was asked for)")
    if a.delete not in DELETE_METHODS:
        raise ConfigError(f"{at}.delete: expected one of {list(DELETE_METHODS)}, got {a.delete!r}")
    if a.delete == "orthanc-rest" and not a.rest_url.startswith(("http://", "https://")):
        raise ConfigError(f"{at}.rest_url: delete: orthanc-rest needs Orthanc's REST URL "
                          f"(http(s)://host:port), got {a.rest_url!r}")
    if a.kind == "folder" and not a.path:
        raise ConfigError(f"{at}: a folder archive needs path")
    if a.password_env and not a.password_env.replace("_", "").isalnum():
        raise ConfigError(
            f"{at}.password_env: expected the NAME of an environment variable, "
            "not a password; got something else"
        )


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return typing.cast(T, cls(**kwargs))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(typing.cast(type, tp), value, where)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {
            _coerce(kt, k, f"{where}"): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")
