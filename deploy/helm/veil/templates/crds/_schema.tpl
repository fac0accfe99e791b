{{/*
The CRDs are templates behind `installCRDs`, not files in the chart's crds/ directory: Helm
installs crds/ once and never upgrades it, while veil's policy schema grows with what the agent
enforces (L7 fields, named ports), and an upgrade must bring the new schema. They are kept on
`helm uninstall` (helm.sh/resource-policy: keep): deleting a CRD deletes every object of it,
and uninstalling the agent must not silently delete the cluster's network policies.

One schema for CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (as in Cilium): the
subset of Cilium's rule that veil's parser (agent/daemon/src/policy/parse.rs) reads, with the
types the apiserver checks:

- Known fields are typed strictly: endpointSelector is an object, toPorts[].ports[].port a
  string (a number or a port name, as Cilium), protocol one of TCP, UDP, SCTP, ICMP, ANY,
  authentication.mode required or disabled, endPort 0-65535, matchExpressions operators the four
  of Kubernetes. A policy that breaks them is refused by the apiserver.
- Unknown fields inside a rule are kept (x-kubernetes-preserve-unknown-fields), not pruned. A
  structural schema otherwise drops them silently (clients that do not ask for strict field
  validation get a warning at most), and dropping can widen a policy: `ingress: [{fromCIDR: [..]}]`
  pruned to `ingress: [{}]` admits every peer, and a misspelt `matchLabel` pruned to `{}`
  selects every endpoint. Kept, they reach veil's strict parser, which refuses the policy
  and reports why in status.nodes.<node>.error, keeping the policy it enforced before.
  The same holds for what Cilium has and veil does not enforce yet: rules.http is in the schema
  (the apiserver accepts it; the agent reports that it cannot enforce it).
*/}}

{{- define "veil.crd.selector" -}}
type: object
description: A label selector (matchLabels, matchExpressions) as Kubernetes'; keys may carry Cilium's source prefix (k8s:).
x-kubernetes-preserve-unknown-fields: true
properties:
  matchLabels:
    type: object
    additionalProperties:
      type: string
  matchExpressions:
    type: array
    items:
      type: object
      x-kubernetes-preserve-unknown-fields: true
      required: ["key", "operator"]
      properties:
        key:
          type: string
          minLength: 1
        operator:
          type: string
          enum: ["In", "NotIn", "Exists", "DoesNotExist"]
        values:
          type: array
          items:
            type: string
{{- end }}

{{- define "veil.crd.ports" -}}
type: array
description: Ports and protocols; absent toPorts means every port and protocol.
items:
  type: object
  x-kubernetes-preserve-unknown-fields: true
  properties:
    port:
      type: string
      description: 'A port number 1-65535 (or a port name, which veil does not enforce yet), always a string: "8080".'
      # Cilium's: 0-65535 or an IANA service name (at least one letter).
      pattern: '^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}|([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*)$'
    endPort:
      type: integer
      format: int32
      minimum: 0
      maximum: 65535
      description: Last port of a range starting at port.
    protocol:
      type: string
      enum: ["TCP", "UDP", "SCTP", "ICMP", "ANY"]
      description: ANY (the default) with a port means TCP, UDP and SCTP.
{{- end }}

{{- define "veil.crd.portRules" -}}
type: array
items:
  type: object
  x-kubernetes-preserve-unknown-fields: true
  required: ["ports"]
  properties:
    ports:
      {{- include "veil.crd.ports" . | nindent 6 }}
    {{- if .l7 }}
    rules:
      type: object
      description: L7 rules. Accepted and stored; veil reports in status that it does not enforce them until its L7 proxy exists.
      x-kubernetes-preserve-unknown-fields: true
      properties:
        http:
          type: array
          items:
            type: object
            x-kubernetes-preserve-unknown-fields: true
            properties:
              method:
                type: string
              path:
                type: string
              host:
                type: string
              headers:
                type: array
                items:
                  type: string
    {{- end }}
{{- end }}

{{- define "veil.crd.authentication" -}}
type: object
description: 'mode: required admits the flow only after both node agents proved the two workloads'' SPIFFE identities in an mTLS handshake; it implies encryption.'
x-kubernetes-preserve-unknown-fields: true
required: ["mode"]
properties:
  mode:
    type: string
    enum: ["required", "disabled"]
{{- end }}

{{/* One rule section: peers (fromEndpoints|toEndpoints), toPorts, and for allow rules authentication. */}}
{{- define "veil.crd.peerRules" -}}
type: array
items:
  type: object
  x-kubernetes-preserve-unknown-fields: true
  properties:
    {{ .peers }}:
      type: array
      description: Absent means any peer; [{}] every endpoint in the policy's namespace.
      items:
        {{- include "veil.crd.selector" . | nindent 8 }}
    toPorts:
      {{- include "veil.crd.portRules" (dict "l7" (not .deny)) | nindent 6 }}
    {{- if not .deny }}
    authentication:
      {{- include "veil.crd.authentication" . | nindent 6 }}
    {{- end }}
{{- end }}

{{- define "veil.crd.rule" -}}
type: object
x-kubernetes-preserve-unknown-fields: true
required: ["endpointSelector"]
properties:
  endpointSelector:
    {{- include "veil.crd.selector" . | nindent 4 }}
  ingress:
    {{- include "veil.crd.peerRules" (dict "peers" "fromEndpoints" "deny" false) | nindent 4 }}
  ingressDeny:
    {{- include "veil.crd.peerRules" (dict "peers" "fromEndpoints" "deny" true) | nindent 4 }}
  egress:
    {{- include "veil.crd.peerRules" (dict "peers" "toEndpoints" "deny" false) | nindent 4 }}
  egressDeny:
    {{- include "veil.crd.peerRules" (dict "peers" "toEndpoints" "deny" true) | nindent 4 }}
  description:
    type: string
{{- end }}

{{/* The whole openAPIV3Schema of a CNP or CCNP. */}}
{{- define "veil.crd.policySchema" -}}
type: object
description: A CiliumNetworkPolicy-style rule set enforced by veil (spec, specs or both).
x-kubernetes-validations:
  - rule: has(self.spec) || has(self.specs)
    message: a policy needs spec or specs
properties:
  apiVersion:
    type: string
  kind:
    type: string
  metadata:
    type: object
  spec:
    {{- include "veil.crd.rule" . | nindent 4 }}
  specs:
    type: array
    items:
      {{- include "veil.crd.rule" . | nindent 6 }}
  status:
    type: object
    description: Written by the veil agents, one entry per node.
    properties:
      nodes:
        type: object
        additionalProperties:
          type: object
          properties:
            enforcing:
              type: boolean
              description: The node enforces this policy (its current generation).
            ok:
              type: boolean
              description: The node accepted the policy; false with error when it refused it and kept its previous state.
            error:
              type: string
              description: Why the node refused the policy (the field and the reason).
            lastUpdated:
              type: string
              format: date-time
            localPolicyRevision:
              type: integer
              format: int64
              description: The node's policy revision that includes this policy.
{{- end }}

{{- define "veil.crd.metadata" -}}
labels:
  {{- include "veil.labels" . | nindent 2 }}
annotations:
  # Kept on `helm uninstall`: deleting a CRD deletes every policy (or identity) in it.
  helm.sh/resource-policy: keep
{{- end }}
