// name: lineage-across
// answers: A feature's residual lineage in its own pack (as lineage follows it) with each step's
// answers: relatives in linked packs (flowdb link): what its ancestors became, or were, there.
// param: feature string required  the feature, PACK/LAYER/MODULE/INDEX (a residual one)
// feature: res
// param: link string null  only this link set (default: every link set of the feature's pack)
// param: above_only bool true  only relatives matched at or above the link's threshold (either way)
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  use only each feature's top max_rank matches per module
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: depth, step_key, step_layer, step_category, step_label, link, relative_key, relative_pack, relative_layer, relative_index, cosine, above, relative_category, step_link_category, relative_label, relative_url
MATCH (f:Feature {key: $feature})
MATCH (f)<-[chain:RESIDUAL*0..]-(step:Feature)
WHERE all(r IN chain WHERE r.rank <= $max_rank AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)))
WITH DISTINCT f, step
CALL (step) {
  // One entry per relative and link set: the step's match of it and its match of the step.
  MATCH (step)-[r:ALIGNS]-(g:Feature)
  WHERE $link IS NULL OR r.link = $link
  WITH g, r.link AS link, collect(r) AS both
  WITH g, link, [r IN both WHERE startNode(r) = step][0] AS out, [r IN both WHERE startNode(r) = g][0] AS back
  WITH g, link, out, back, coalesce(out.above, false) OR coalesce(back.above, false) AS above
  WHERE above OR NOT $above_only
  RETURN collect({g: g, link: link, out: out, back: back, above: above}) AS relatives
}
// A step with no relative there still has its row.
UNWIND CASE relatives WHEN [] THEN [null] ELSE relatives END AS relative
WITH f, step, relative.g AS g, relative.link AS link, relative.out AS out, relative.back AS back,
     relative.above AS above
RETURN f.layer - step.layer AS depth, step.key AS step_key, step.layer AS step_layer,
       step.category AS step_category, step.label AS step_label, link, g.key AS relative_key,
       g.pack AS relative_pack, g.layer AS relative_layer, g.index AS relative_index,
       coalesce(out.cosine, back.cosine) AS cosine, above,
       coalesce(back.category, COLLECT { MATCH (g)-[x:ALIGNS {link: link}]->() RETURN x.category LIMIT 1 }[0]) AS relative_category,
       coalesce(out.category, COLLECT { MATCH (step)-[x:ALIGNS {link: link}]->() RETURN x.category LIMIT 1 }[0]) AS step_link_category,
       g.label AS relative_label,
       COLLECT { MATCH (s:SAE {key: g.pack + '/' + toString(g.layer) + '/' + g.module}) RETURN s.np_url + toString(g.index) }[0] AS relative_url
ORDER BY depth, step_key, link, cosine DESC, relative_key
