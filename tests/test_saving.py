"""Saving and publishing: saves that keep the newest complete model, one writer per folder, a full disk said and
cleaned up, the same file permissions, bit-equal round trips, and published folders free of secrets and links."""

import getpass
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import scalevae
from scalevae import hub
from scalevae.card import public_command
from scalevae.outputs import write_atomically
from tests.model_tester import (
    TOKEN,
    assert_same_tensors,
    checkpointing_trainer,
    folder_bytes,
    saved_tensors,
    strategies_and_injections,
    tester,
)

# -- atomic saves -------------------------------------------------------------------------------------------------


def other_weights(model, seed):
    torch.manual_seed(seed)
    other = scalevae.ScaleVAEForLatentLM(model.config)
    with torch.no_grad():
        other.collapse.scale_factors.fill_(float(seed))
    return other


def test_recovery_restores_the_newest_complete_save_not_the_newest_mtime(tmp_path, tiny_parts):
    model, *tokenizers = tiny_parts
    folder = tmp_path / "model"
    older = hub.save_model(tmp_path / "v1", other_weights(model, 1), *tokenizers)
    newer = hub.save_model(tmp_path / "v2", other_weights(model, 2), *tokenizers)
    partly_deleted = hub.save_model(tmp_path / "v3", other_weights(model, 3), *tokenizers)
    (partly_deleted / "model.safetensors").unlink()
    os.rename(newer, tmp_path / ".model.old-00000002")
    os.rename(older, tmp_path / ".model.old-00000001")
    os.rename(partly_deleted, tmp_path / ".model.tmp-00000003")
    for age, name in enumerate([".model.old-00000002", ".model.old-00000001", ".model.tmp-00000003"]):
        os.utime(tmp_path / name, (1e9 + age * 1e6, 1e9 + age * 1e6))  # newest mtime: the incomplete one
    assert hub.recover_interrupted_save(folder) == folder
    assert saved_tensors(folder)["collapse.scale_factors"].tolist() == [2.0] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # leftovers cleaned


def test_a_save_cleans_the_leftovers_of_killed_saves(tmp_path, tiny_parts):
    folder = hub.save_model(tmp_path / "model", *tiny_parts)
    for name in (".model.tmp-deadbeef", ".model.old-cafebabe"):
        (tmp_path / name / "decoder_tokenizer").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    hub.save_model(folder, *tiny_parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_saved_file_gets_the_same_permissions(tmp_path, tiny_parts, umask):
    previous = os.umask(umask)
    try:
        folder = hub.save_model(tmp_path / "model", *tiny_parts)
    finally:
        os.umask(previous)
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


@strategies_and_injections()
def test_save_and_load_give_bit_equal_outputs(tmp_path, strategy, injection):
    model = tester.get_model(collapse_strategy=strategy, latent_injection=injection, dropout=0.0)
    tester.train_steps(model, steps=1, batch_size=4)  # moves the factors, BN statistics and the fitted prior
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = scalevae.ScaleVAEForLatentLM.from_pretrained(tmp_path).eval()
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    batch = tester.prepare_inputs(batch_size=4, seed=9)
    outputs = []
    for each in (model, loaded):
        torch.manual_seed(3)  # the stochastic strategies sample z in forward
        out = each(**batch)
        generated = each.generate(latents=out.decoder_mu, max_new_tokens=3)
        outputs.append(
            [out.loss, out.logits, out.mu, out.logvar, out.decoder_mu, out.prior_mean, out.prior_std, generated]
        )
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


# -- one writer per folder ----------------------------------------------------------------------------------------


def hold_lock_in_thread(folder):
    """Hold `folder`'s writer lock in another thread until the returned event is set."""
    import threading

    held, release = threading.Event(), threading.Event()

    def holder():
        with hub.writer_lock(folder):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)
    return release, thread


def test_a_second_writer_of_a_folder_fails_at_once(tmp_path, tiny_parts, tiny_encoder_path):
    folder = tmp_path / "model"
    release, thread = hold_lock_in_thread(folder)
    try:
        with pytest.raises(hub.FolderInUseError, match=rf"{folder} is being written by another writer \(process"):
            hub.save_model(folder, *tiny_parts)
        trainer = checkpointing_trainer(folder, tiny_encoder_path)
        with pytest.raises(hub.FolderInUseError, match=rf"{os.getpid()}"):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        release.set()
        thread.join()
    hub.save_model(folder, *tiny_parts)  # the lock went with its holder
    assert not (tmp_path / ".model.lock").exists()


def test_concurrent_saves_of_one_folder_never_break_each_other(tmp_path, tiny_parts):
    """12 of 30 concurrent saves failed with FileNotFoundError: each save's cleanup deleted the others' temporary
    folders. Now each either saves or is refused by the lock, and the folder is always complete."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "model"

    def save(_):
        try:
            hub.save_model(folder, *tiny_parts)
        except hub.FolderInUseError:
            return "refused"
        return "saved"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(save, range(12)))
    assert "saved" in outcomes and set(outcomes) <= {"saved", "refused"}
    assert hub.missing_files(folder) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_another_process_holding_the_lock_is_named_by_its_pid(tmp_path, tiny_parts):
    import subprocess
    import sys

    folder = tmp_path / "model"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom scalevae.hub import writer_lock\nwith writer_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(60)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(hub.FolderInUseError, match=rf"process {child.pid}\b"):
            hub.save_model(folder, *tiny_parts)
    finally:
        child.kill()
        child.wait()
    hub.save_model(folder, *tiny_parts)  # a killed holder leaves no lock behind


# -- a full disk --------------------------------------------------------------------------------------------------


def test_no_space_left_is_said_and_the_partial_save_removed(tmp_path, tiny_parts, monkeypatch):
    folder = hub.save_model(tmp_path / "model", *tiny_parts)
    before = saved_tensors(folder)

    def full_disk(self, directory, *args, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"\0" * 100)  # what was written before the disk filled
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scalevae.ScaleVAEForLatentLM, "save_pretrained", full_disk)
    with pytest.raises(
        OSError, match=rf"no space left on device while writing {folder} .*the partial save .* was rem"
    ):
        hub.save_model(folder, *tiny_parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert_same_tensors(saved_tensors(folder), before)  # the previous save is intact


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (needs the right to mount: root on Linux), unmounted after the test."""
    import subprocess

    mounted = []

    def make(size_bytes):
        path = tmp_path / "disk"
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root): {result.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_a_really_full_disk_during_save_model(small_disk, tiny_parts):
    disk = small_disk(1 << 20)  # the tiny model's weights take about 8 MB
    with pytest.raises(OSError, match=rf"no space left on device while writing {disk / 'model'}") as raised:
        hub.save_model(disk / "model", *tiny_parts)
    assert raised.value.errno == 28
    assert list(disk.iterdir()) == []


def test_a_really_full_disk_during_a_checkpoint_removes_it(small_disk, tiny_encoder_path, tmp_path):
    trainer = checkpointing_trainer(tmp_path / "not-used", tiny_encoder_path)
    weights = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    disk = small_disk(weights + (3 << 20))  # the weights fit, the optimizer's two moments do not
    trainer.args.output_dir = str(disk / "run")
    with pytest.raises(OSError, match=rf"no space left on device while writing {disk / 'run' / 'checkpoint-2'}"):
        trainer.train()
    assert not (disk / "run" / "checkpoint-2").exists()


# -- publishing: no secrets, no machine paths, no links -----------------------------------------------------------


def test_published_folders_hold_no_token_path_or_user_name(tiny_run, tiny_encoder_path, train_data):
    home, user = str(Path.home()), getpass.getuser()
    private = [
        TOKEN,
        str(tiny_run),
        tiny_encoder_path,
        str(train_data),
        str(train_data.parent),
        home,
        f"/{user}/",
        f"-of-{user}",
        os.path.dirname(scalevae.__file__),
    ]
    for folder in (tiny_run / "final", tiny_run / "checkpoint-3"):
        # what push_to_hub uploads: no Trainer state (its training_args.bin holds the token)
        files = hub.folder_files(folder)
        assert "model.safetensors" in files and "training_args.bin" not in files
        for name in files:
            path = folder / name
            text = path.read_bytes().decode("utf-8", errors="replace")
            for secret in private:
                assert secret not in text, (path.relative_to(folder), secret)
    card = (tiny_run / "final" / "README.md").read_text()
    assert "--hub_token '***'" in card and "local file `ptb.train.txt`" in card
    config = json.loads((tiny_run / "final" / "config.json").read_text())
    assert config["encoder"]["_name_or_path"] == Path(tiny_encoder_path).name


def test_public_command_hides_credentials_and_local_paths(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("x\n")
    command = public_command(
        [
            "scalevae",
            "train",
            "--hub_token",
            TOKEN,
            "--api_key=abc",
            "--db_password",
            "pw",
            "--client_secret",
            "s3",
            "--use_auth_token",
            "--train_file",
            str(data),
            "--run_name",
            f"x{TOKEN}",
        ]
    )
    assert command == (
        "scalevae train --hub_token '***' '--api_key=***' --db_password '***' --client_secret '***' "
        "--use_auth_token --train_file corpus.txt --run_name 'x***'"
    )


def test_only_regular_files_inside_the_folder_are_published_without_trainer_state(tiny_folder_copy, tmp_path, caplog):
    folder = tiny_folder_copy
    secret = tmp_path / "secret.txt"
    secret.write_text(TOKEN)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.txt").write_text(TOKEN)
    os.symlink(secret, folder / "notes.txt")
    os.symlink(tmp_path / "elsewhere", folder / "linked_folder")
    checkpoint = folder / "checkpoint-3"  # a Trainer checkpoint inside a model folder: its state at any depth
    checkpoint.mkdir()
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "README.md"):
        (checkpoint / name).write_text(TOKEN if name == "training_args.bin" else "x")
    with caplog.at_level(logging.WARNING, logger="scalevae.hub"):
        files = hub.folder_files(folder)
    assert "checkpoint-3/README.md" in files and "model.safetensors" in files
    leaked = [name for name in files if "notes" in name or "linked_folder" in name or name.startswith("checkpoint-3/")]
    assert leaked == ["checkpoint-3/README.md"], files
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert str(folder / "notes.txt") in warned and str(folder / "linked_folder") in warned


def test_push_refuses_a_folder_whose_weights_are_a_link(tiny_folder_copy, tmp_path):
    folder = tiny_folder_copy
    os.rename(folder / "model.safetensors", tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors would not be uploaded \(a link"):
        hub.push_to_hub(folder, "someone/model")  # refused before any Hub call


# -- readers see one snapshot (issue 28) --------------------------------------------------------------------------------


def resave_forever(folder, encoder_path, saves, ready, stop):
    """A second process: save two models of different latent sizes (scale factors 4 x 1.0 and 6 x 2.0) into one
    folder in turn, as fast as it can, until `stop`; `saves` counts them."""
    torch.set_num_threads(1)
    models = []
    for size, factor in ((4, 1.0), (6, 2.0)):
        model, *tokenizers = tester.build(encoder_path, latent_size=size)
        with torch.no_grad():
            model.collapse.scale_factors.fill_(factor)
        models.append(model)
    while not stop.is_set():
        hub.save_model(folder, models[saves.value % 2], *tokenizers)
        saves.value += 1
        ready.set()


def test_loads_during_saves_read_one_save(tmp_path, tiny_encoder_path, capsys):
    """One process re-saving a folder while another loaded it: 31 of 212 loads succeeded, the rest mixed one save's
    config with the next one's weights, or found no folder; `scalevae generate` failed every time."""
    import multiprocessing

    from scalevae.cli import main

    context = multiprocessing.get_context("spawn")
    folder = tmp_path / "model"
    saves, ready, stop = context.Value("i", 0), context.Event(), context.Event()
    writer = context.Process(target=resave_forever, args=(folder, tiny_encoder_path, saves, ready, stop), daemon=True)
    writer.start()
    try:
        assert ready.wait(120), "the writer never saved"
        first, failures = saves.value, []
        for attempt in range(10):
            try:
                if attempt % 5 == 4:
                    main(["generate", str(folder), "--sample", "1", "--max_new_tokens", "2", "--device", "cpu"])
                    continue
                text = scalevae.LatentText.from_pretrained(folder)
                factors = text.model.collapse.scale_factors.tolist()
                assert factors == [{4: 1.0, 6: 2.0}[text.model.config.latent_size]] * text.model.config.latent_size
                assert text.model.encoder.config.vocab_size == len(text.encoder_tokenizer)
            except Exception as error:  # noqa: BLE001 - every failure is counted and shown
                failures.append(f"{type(error).__name__}: {error}")
        during = saves.value - first
    finally:
        stop.set()
        writer.join(60)
        if writer.is_alive():
            writer.kill()
    assert failures == []
    assert during >= 5, f"only {during} saves during the loads: the test did not exercise concurrency"
    capsys.readouterr()


def test_a_folder_missing_between_the_two_renames_names_the_copy_and_the_recovery(tmp_path, tiny_parts, monkeypatch):
    """A kill between the save's two renames left "does not exist", with no word of the complete copy beside it."""
    import loading_scalevae

    monkeypatch.setattr(loading_scalevae, "RENAME_PATIENCE_S", 0.2)  # how long a load waits for the second rename
    folder = hub.save_model(tmp_path / "model", *tiny_parts)
    aside = tmp_path / ".model.old-0123abcd"
    folder.rename(aside)
    for load in (
        scalevae.load_pretrained,
        scalevae.LatentText.from_pretrained,
        scalevae.ScaleVAEForLatentLM.from_pretrained,
    ):
        with pytest.raises(FileNotFoundError, match=rf"{aside}.*recover_interrupted_save\('{folder}'\)"):
            load(folder)
    assert hub.recover_interrupted_save(folder) == folder
    scalevae.load_pretrained(folder)


# -- validate, then change; validate before every save (issue 28) ----------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (("mixture", 0), r"prior_components=0 must be an integer in \[1, 65536\]"),
        (("mixture", -3), r"prior_components=-3"),
        (("mixture", 2.5), r"prior_components=2.5"),
        (("mixture", True), r"prior_components=True"),
        (("gaussian", None), r"prior='gaussian' is not one of"),
        ((None, None), r"prior=None is not one of"),
    ],
)
def test_a_refused_setter_changes_nothing_and_the_next_save_loads(own_parts, tmp_path, args, match):
    model, *tokenizers = own_parts
    config_before = model.config.to_dict()
    prior_before = {k: v.clone() for k, v in model.fitted_prior.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.set_prior(*args)
    assert model.config.to_dict() == config_before
    assert prior_before.keys() == model.fitted_prior.state_dict().keys()
    for key, value in model.fitted_prior.state_dict().items():
        assert torch.equal(value, prior_before[key]), key
    folder = hub.save_model(tmp_path / "model", model, *tokenizers)
    assert scalevae.load_pretrained(folder)[0].config.to_dict()["prior"] == config_before["prior"]


def test_an_accepted_setter_saves_a_folder_that_loads(own_parts, tmp_path):
    model, *tokenizers = own_parts
    model.set_prior("mixture", components=3)
    loaded = scalevae.load_pretrained(hub.save_model(tmp_path / "model", model, *tokenizers))[0]
    assert (loaded.config.prior, loaded.config.prior_components) == ("mixture", 3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("prior_components", 0, r"Not saved: the model's config would not load \(prior_components=0"),
        ("kl_weight", float("nan"), r"Not saved.*kl_weight=nan"),
        ("latent_injection", "everywhere", r"Not saved.*latent_injection='everywhere'"),
        # Valid values that describe another model than the one whose tensors are saved.
        (
            "latent_size",
            8,
            r"(?s)Not saved: the model.s config no longer describes its tensors.*latent_head.proj.weight",
        ),
        ("prior", "mixture", r"fitted_prior.component_loc: \(1, 4\), the config gives \(4, 4\)"),
        ("prior", "fitted", r"fitted_prior.component_loc: not in the config"),
        ("latent_injection", "embedding", r"injection.to_memory.weight: not in the config"),
    ],
)
def test_no_save_writes_a_folder_that_would_not_load(own_parts, tiny_folder, tmp_path, field, value, match):
    """A config changed by hand is checked by every save (save_model, save_pretrained, Trainer checkpoints): refused
    before anything is written, the folder saved before left as it was."""
    model, *tokenizers = own_parts
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    before = folder_bytes(folder)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=match):
        hub.save_model(folder, model, *tokenizers)
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path / "plain")
    assert folder_bytes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder, no leftover


def test_validated_copy_names_unknown_fields_with_a_suggestion(tiny_parts):
    model = tiny_parts[0]
    with pytest.raises(
        ValueError, match=r"'prior_component' is not a ScaleVAEConfig field\. Did you mean 'prior_components'"
    ):
        model.config.validated_copy(prior_component=3)


@pytest.fixture
def own_parts(tiny_encoder_path):
    """A model (and its tokenizers) this test may change."""
    return tester.build(tiny_encoder_path)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text('{"old": 1}')

    def fail(self, *args, **kwargs):
        Path.write_bytes(self, b'{"ne')  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, '{"new": 2}')
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert path.read_text() == '{"old": 1}'
