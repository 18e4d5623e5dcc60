"""What a run folder holds: the names of the files probkit writes there (docs/commands.md, run folders).

Both the run folder's keeper (probkit.runs) and the listing of runs (probkit.catalog) read
these names, so neither needs the other to know them.
"""

RUNS_DIR = "runs"
CHECKPOINT = "checkpoint.safetensors"
LOCK = ".probkit.lock"
# run.json's `files` lists every file probkit wrote into the folder, relative to it; a folder that
# holds no run.json yet (show's train.npz, an unfinished fit) keeps the same list here
MANIFEST_KEY = "files"
PENDING = ".probkit-files.json"
# what a fit writes (the run itself): no other command's output ever replaces one of these
RUN_FILES = ("run.json", "params.safetensors", CHECKPOINT, "history.csv", "spec.yaml")
OWN_FILES = (*RUN_FILES, LOCK, PENDING)
# what a fit keeps of its folder when it resumes (the rest was made from params about to change)
RESUMED_FILES = ("params.safetensors", CHECKPOINT, "history.csv", "spec.yaml")
# a run written before run.json listed its files: only these names are certainly probkit's
LEGACY_FILES = (*RUN_FILES, "samples.png")
