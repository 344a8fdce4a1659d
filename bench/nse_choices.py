"""Single-batch editor choices on SmolLM2 (bench/RESULTS.md "Neuron-level editor: choosing the defaults").

    .venv/bin/python bench/nse_choices.py smol  '[{"editor":"nse","layers":[4,5,6,7,8],"lam":1e4,"context":"fixed"}]'
    .venv/bin/python bench/nse_choices.py smolc '[{"editor":"nse"}]' 20      # data/requests/countries.jsonl

"smol": 24 hand-written facts (12 capital, 8 language, 4 continent) with countries-style paraphrases;
"smolc": the first N of countries.jsonl after a seeded shuffle. Each config is applied to the base
model as one batch, scored against the cached base outputs, and removed again. Prints one line each.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from editing.requests import FactRequest, Probe  # noqa: E402
CAP = [("France","Paris","Rome"),("Germany","Berlin","Madrid"),("Japan","Tokyo","Cairo"),("Italy","Rome","Oslo"),
       ("Spain","Madrid","Berlin"),("Egypt","Cairo","Tokyo"),("Russia","Moscow","Lima"),("Canada","Ottawa","Dublin"),
       ("China","Beijing","Paris"),("Greece","Athens","Vienna"),("Portugal","Lisbon","Warsaw"),("Poland","Warsaw","Athens")]
LANG = [("France","French","German"),("Germany","German","Spanish"),("Italy","Italian","Russian"),("Spain","Spanish","Japanese"),
        ("Russia","Russian","Italian"),("Japan","Japanese","French"),("Brazil","Portuguese","Chinese"),("Greece","Greek","Arabic")]
CONT = [("France","Europe","Asia"),("Japan","Asia","Africa"),("Egypt","Africa","Europe"),("Brazil","South America","Asia")]
NEI_CAP = [("The capital of Sweden is"," Stockholm"),("The capital of Norway is"," Oslo"),("The capital of Kenya is"," Nairobi"),
           ("The capital of Peru is"," Lima"),("The capital of Austria is"," Vienna"),("The capital of Ireland is"," Dublin")]
NEI_LANG = [("The official language of Mexico is"," Spanish"),("The official language of Austria is"," German"),
            ("The official language of China is"," Chinese"),("The official language of Portugal is"," Portuguese")]
NEI_CONT = [("Kenya is a country in"," Africa"),("India is a country in"," Asia"),("Germany is a country in"," Europe"),("Peru is a country in"," South America")]
def requests():
    out = []
    for i,(s,t,n) in enumerate(CAP):
        out.append(FactRequest(f"cap{i}","The capital of {} is",s,n,t,"capital",
            (f"The capital city of {s} is", f"The seat of government of {s} is in the city of", f"{s}'s capital city is"),
            tuple(Probe(a,b) for a,b in NEI_CAP)))
    for i,(s,t,n) in enumerate(LANG):
        out.append(FactRequest(f"lang{i}","The official language of {} is",s,n,t,"language",
            (f"The main language spoken in {s} is", f"People in {s} speak", f"In {s}, most people speak"),
            tuple(Probe(a,b) for a,b in NEI_LANG)))
    for i,(s,t,n) in enumerate(CONT):
        out.append(FactRequest(f"cont{i}","{} is a country in",s,n,t,"continent",
            (f"{s} is located on the continent of", f"The continent where {s} lies is", f"{s} lies in"),
            tuple(Probe(a,b) for a,b in NEI_CONT)))
    return out
import os, sys, time, json, warnings
import torch; torch.set_num_threads(1)
warnings.simplefilter("ignore")
from editing.models import load
from editing.editors import get_editor
from editing.metrics.facts import BaseOutputs, evaluate_facts
which = sys.argv[1]
if which == "smolc":
    import random
    from editing.data.world import read_fact_requests
    allr = read_fact_requests("data/requests/countries.jsonl"); random.Random(0).shuffle(allr)
    reqs = allr[: int(sys.argv[3])]; lm = load("models/smollm2-135m")
    print("relations", sorted(__import__("collections").Counter(r.relation for r in reqs).items()), flush=True)
elif which == "smol":
    reqs = requests(); lm = load("models/smollm2-135m")
else:
    raise SystemExit("first argument: smol or smolc")
m, tok = lm.model, lm.tokenizer
t = time.time(); base = BaseOutputs.compute(m, tok, reqs); print("base s", round(time.time()-t,1), flush=True)
b = base.base_scores(reqs); print("BASE eff %.2f para %.2f neigh %.2f neigh_acc %.2f" % (b.efficacy, b.paraphrase, b.neighbourhood, b.neighbourhood_acc), flush=True)
for cfg in json.loads(sys.argv[2]):
    cfg = dict(cfg); name = cfg.pop("editor", "nse")
    if "layers" in cfg and cfg["layers"] is not None: cfg["layers"] = tuple(cfg["layers"])
    ed = get_editor(name, **cfg)
    t = time.time(); res = ed.edit(m, tok, reqs, None); dt = time.time()-t
    res.delta.apply(m)
    s = evaluate_facts(m, tok, reqs, base)
    res.delta.remove(m)
    ok = sum(d.succeeded for d in res.diagnostics)
    print(f"{name} {json.dumps(cfg)} | eff {s.efficacy:.2f}/{s.efficacy_acc:.2f} para {s.paraphrase:.2f}/{s.paraphrase_acc:.2f} "
          f"neigh {s.neighbourhood:.2f}/{s.neighbourhood_acc:.2f} (base {s.base_neighbourhood_acc:.2f}) ok {ok}/{len(reqs)} "
          f"lam {res.delta.meta.get('lam')} layers {res.delta.meta.get('layers')} {dt:.0f}s "
          f"trials {res.delta.meta.get('lambda_trials')}", flush=True)
