// name: thresholds
// answers: Per layer of a pack, the cut-offs its build applied, the rule that set them, the chance
// answers: level of a top-1 score at each place (R_{L-1}, M_L, A_L) and the share of top-1 matches above it.
// param: pack string required  the pack name
// columns: layer, rule, t_res, t_mlp, t_att, chance_res, chance_mlp, chance_att, above_chance_res, above_chance_mlp, above_chance_att
MATCH (s:SAE {pack: $pack, module: 'res'})
RETURN s.layer AS layer, s.threshold_rule AS rule, s.t_res AS t_res, s.t_mlp AS t_mlp, s.t_att AS t_att,
       s.chance_res AS chance_res, s.chance_mlp AS chance_mlp, s.chance_att AS chance_att,
       s.above_chance_res AS above_chance_res, s.above_chance_mlp AS above_chance_mlp,
       s.above_chance_att AS above_chance_att
ORDER BY layer
